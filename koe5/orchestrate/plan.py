"""What would run, without running it: `koe5-run --dry-run` prints it, `--emit` freezes the spec and prints
the job a cluster user submits, and `--from-run` turns a past run's stored spec back into a file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from koe5.orchestrate import EXIT_OK


def spec_from_run(run: str) -> str:
    """The stored resolved spec of a past run, written to a file that `expand` can read. An unknown run is
    a LookupError (the caller's one-line error)."""
    import tempfile

    from koe5.registry import Registry, RegistryError

    try:
        record = Registry().get_run(run)
    except RegistryError as e:
        raise LookupError(str(e)) from None
    path = Path(tempfile.mkdtemp(prefix="koe5-from-run-")) / f"{record['run_id']}.yaml"
    path.write_text(record["spec_yaml"], encoding="utf-8")
    return str(path)


def dry_run(resolved: list, as_json: bool) -> int:
    from koe5.launch import training_command

    entries = []
    for rs in resolved:
        run_dir = Path(rs.spec.output_dir) / f"{rs.spec.name}-<run_id>"
        command = training_command(rs.spec, run_dir / "spec.yaml", run_dir, port=29500)
        entries.append({"spec": rs.data, "spec_hash": rs.spec_hash, "command": command,
                        "deepspeed": rs.deepspeed_config(), "sweep_values": rs.sweep_values})
    if as_json:
        if len(entries) == 1:
            entries[0].pop("sweep_values")
            print(json.dumps(entries[0], ensure_ascii=False, default=str))
        else:
            print(json.dumps(entries, ensure_ascii=False, default=str))
        return EXIT_OK
    for rs, entry in zip(resolved, entries):
        if entry["sweep_values"]:
            print(f"# sweep member: {entry['sweep_values']}")
        print(rs.to_yaml().rstrip())
        print(f"# spec_hash: {rs.spec_hash}")
        print(f"# deepspeed config: {json.dumps(entry['deepspeed'], sort_keys=True)}")
        print(f"# command: {' '.join(entry['command'])}\n")
    return EXIT_OK


def emit(resolved: list, kind: str) -> int:
    """Freeze each spec into <output_dir>/<name>-<spec_hash>/ (the run directory the job writes into) and
    print what a cluster user submits. The job trains; record its results afterwards with
    `koe5 eval --model <run dir>/model`."""
    import dataclasses
    import shlex

    from koe5.launch import slurm_script, training_command

    for rs in resolved:
        spec = rs.spec
        if kind != "slurm":  # the launcher the user asked for, whatever the spec's backend says
            spec = dataclasses.replace(spec, launch=dataclasses.replace(spec.launch, backend=kind))
        run_dir = (Path(spec.output_dir) / f"{spec.name}-{rs.spec_hash}").resolve()
        frozen = rs.freeze(run_dir / "spec.yaml")
        if kind == "slurm":
            text = slurm_script(spec, frozen, run_dir)
        else:
            node_rank = "$NODE_RANK" if spec.launch.nnodes > 1 and not spec.launch.hostfile else None
            command = training_command(spec, frozen, run_dir, node_rank=node_rank)
            text = " ".join(c if c.startswith("$") else shlex.quote(c) for c in ["python", *command[1:]])
        print(text.rstrip())
        print(f"# frozen spec: {frozen}", file=sys.stderr)
    return EXIT_OK
