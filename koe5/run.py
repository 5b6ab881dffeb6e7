"""`koe5-run SPEC [key=value ...]`: spec -> run -> train -> evaluate -> record.

This process is the orchestrator and the registry's only writer for the run. It validates the spec,
records the run, freezes the resolved spec into the run directory, starts the training ranks through
the launcher, evaluates the exported model, and records metrics, the training log and artifacts.
Training itself runs in child processes that never open the registry.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from koe5.provenance import provenance

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
HEARTBEAT_S = float(os.environ.get("KOE5_HEARTBEAT_S", "10"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="koe5-run", description="Validate an experiment spec, train, evaluate and record the run.")
    parser.add_argument("spec", nargs="?", help="experiment YAML (omit with --from-run or --resume)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="typed overrides, e.g. train.lr=1e-5")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved spec, its hash and the command")
    parser.add_argument("--json", action="store_true", help="with --dry-run: one JSON object (a list for sweeps)")
    parser.add_argument("--force", action="store_true", help="run even if this spec hash already finished")
    parser.add_argument("--from-run", metavar="RUN", help="re-run the resolved spec stored with RUN")
    parser.add_argument("--resume", metavar="RUN", help="continue an interrupted RUN from its newest checkpoint")
    parser.add_argument("--emit", choices=["slurm", "deepspeed", "torchrun"],
                        help="freeze the spec and print the job script (slurm) or launch command a cluster "
                             "user submits; runs nothing here")
    args = parser.parse_args(argv)
    by_run = args.from_run or args.resume
    if args.spec and "=" in args.spec and not args.spec.endswith((".yaml", ".yml")) and by_run:
        args.overrides.insert(0, args.spec)  # `koe5-run --from-run X a=b`: the first override lands in spec
        args.spec = None
    if not args.spec and not by_run:
        parser.error("give a spec file, --from-run RUN or --resume RUN")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from koe5.spec import SpecError, expand

    if args.resume:
        from koe5.registry import Registry, RegistryError

        try:
            return resume(args.resume, Registry(), args.overrides)
        except RegistryError as e:
            print(f"koe5-run: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT

    try:
        spec_path = _spec_from_run(args.from_run) if args.from_run else args.spec
        # A dry run launches nothing here, so the spec is checked as one that may run elsewhere; a real
        # run is checked against this machine's devices and files.
        resolved = expand(spec_path, args.overrides, check_devices=not (args.dry_run or args.emit))
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return EXIT_BAD_INPUT
    except LookupError as e:
        print(f"koe5-run: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for rs in resolved:
        for warning in rs.warnings:
            print(f"koe5-run: warning: {warning}", file=sys.stderr)

    if args.dry_run:
        return dry_run(resolved, args.json)
    if args.emit:
        return emit(resolved, args.emit)

    from koe5.registry import Registry

    registry = Registry(resolved[0].spec.registry.path)
    sweep_id = None
    if len(resolved) > 1:
        sweep_id = registry.create_sweep(resolved[0].spec.name, spec_path, sorted(resolved[0].sweep_values))
        print(f"sweep {sweep_id}: {len(resolved)} runs")
    status = EXIT_OK
    for rs in resolved:
        status = max(status, run_one(rs, registry, sweep_id, force=args.force))
    return status


def _spec_from_run(run: str) -> str:
    """The stored resolved spec of a past run, written to a file that `expand` can read."""
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


class Heartbeat(threading.Thread):
    """Tells the registry this run is alive and folds new training-log rows in, every few seconds.
    A run whose heartbeat stops (SIGKILL, power loss) shows as `crashed` to readers."""

    def __init__(self, registry, run_id: str, log_path: Path):
        super().__init__(daemon=True)
        self.registry, self.run_id, self.log_path = registry, run_id, log_path
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(HEARTBEAT_S):
            try:
                self.registry.heartbeat(self.run_id)
                if self.log_path.exists():
                    self.registry.fold_train_log(self.run_id, self.log_path)
            except Exception as e:  # a busy registry must never stop training
                print(f"koe5-run: heartbeat skipped ({e})", file=sys.stderr)


class Killed(Exception):
    pass


def _raise_killed(signum, frame):
    raise Killed(f"received {signal.Signals(signum).name}")


def run_one(rs, registry, sweep_id: str | None, force: bool) -> int:
    """Train `rs` as a new run, or resume the interrupted run of the same spec, or do nothing if it finished."""
    from koe5.preflight import preflight
    from koe5.spec.deepspeed import deepspeed_config
    from koe5.spec.schema import world_size

    spec = rs.spec
    finished = registry.find_runs(rs.spec_hash, status="finished")
    if finished and not force:
        print(f"koe5-run: spec {rs.spec_hash} already has a finished run, {finished[0]['run_id']}; "
              f"nothing to do (use --force to train again, `koe5 show {finished[0]['run_id']}` to see it)")
        return EXIT_OK
    if not force:
        for candidate in registry.find_runs(rs.spec_hash):
            if candidate["status"] in RESUMABLE and _checkpoint_step(_run_dir(registry, candidate)) is not None:
                print(f"koe5-run: spec {rs.spec_hash} has an interrupted run, {candidate['run_id']} "
                      f"({candidate['status']}); resuming it (use --force to start a new run instead)")
                return resume(candidate["run_id"], registry, [])

    problems = preflight(spec)
    if problems:
        print("koe5-run: cannot start here:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        checks = check_data(spec)
    except ValueError as e:  # DataError, BenchmarkError: they name the file and line
        print(f"koe5-run: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    world = world_size(spec)
    ds_config = deepspeed_config(spec, world)
    run_id = registry.create_run(spec.name, rs.spec_hash, rs.to_yaml(), kind="train", status="queued",
                                 tags=spec.tags, sweep_id=sweep_id, output_dir=None,
                                 provenance=provenance(world, spec.train.device), ds_config=ds_config,
                                 sweep_values=rs.sweep_values or None)
    run_dir = (Path(spec.output_dir) / f"{spec.name}-{run_id}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    rs.freeze(run_dir / "spec.yaml")
    (run_dir / "data_checks.json").write_text(json.dumps(checks, indent=2, ensure_ascii=False))
    registry.add_artifact(run_id, "run_dir", str(run_dir))
    (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    print(f"run {run_id}: {spec.name} -> {run_dir}")
    return execute(rs, registry, run_id, run_dir, baseline_sweep=sweep_id, with_baseline=True)


# A run in one of these states stopped before it finished; with a checkpoint it can continue.
RESUMABLE = ("failed", "killed", "crashed")


def _run_dir(registry, record: dict) -> Path | None:
    full = registry.get_run(record["run_id"])
    return next((Path(a["path"]) for a in full["artifacts"] if a["kind"] == "run_dir"), None)


def _checkpoint_step(run_dir: Path | None) -> int | None:
    from koe5.train import checkpoint

    latest = checkpoint.latest(run_dir) if run_dir else None
    return checkpoint.info(latest)["step"] if latest else None


def resume(run: str, registry, overrides: list[str]) -> int:
    """Continue an interrupted run from its newest checkpoint, in the same run directory and run id.
    Overrides may only change keys marked resume-safe in the schema (logging, checkpointing, evaluation)."""
    from koe5.spec import SpecError, expand, load_frozen
    from koe5.spec.diff import diff
    from koe5.spec.introspect import resume_safe

    record = registry.get_run(run)
    run_id = record["run_id"]
    if record["status"] not in RESUMABLE:
        print(f"koe5-run: run {run_id} is {record['status']}; only a failed, killed or crashed run can be resumed",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    run_dir = _run_dir(registry, record)
    step = _checkpoint_step(run_dir)
    if step is None:
        print(f"koe5-run: run {run_id} has no checkpoint to resume from (set train.save_every to write them); "
              f"start it again with `koe5-run --from-run {run_id} --force`", file=sys.stderr)
        return EXIT_BAD_INPUT
    frozen = run_dir / "spec.yaml"
    old = load_frozen(frozen)
    try:
        rs = expand(frozen, overrides)[0] if overrides else old
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return EXIT_BAD_INPUT
    unsafe = [(k, a, b) for k, a, b in diff(old.data, rs.data) if not resume_safe(k)]
    if unsafe:
        lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in unsafe)
        print(f"koe5-run: cannot resume run {run_id} with a changed experiment; these keys change the training "
              f"itself:\n{lines}\nStart a new run instead (koe5-run --from-run {run_id} ...).", file=sys.stderr)
        return EXIT_BAD_INPUT
    if rs is not old:
        rs.freeze(frozen)
    registry.drop_train_log_after(run_id, step)
    print(f"run {run_id}: resuming from step {step} -> {run_dir}")
    return execute(rs, registry, run_id, run_dir, baseline_sweep=None, with_baseline=False)


def execute(rs, registry, run_id: str, run_dir: Path, *, baseline_sweep: str | None, with_baseline: bool) -> int:
    """Launch the ranks on the frozen spec in `run_dir`, then evaluate and record; the common path of a new
    run and a resumed one."""
    from koe5.launch import resolve_backend, run_training, training_command

    spec = rs.spec
    previous = {s: signal.signal(s, _raise_killed) for s in (signal.SIGTERM, signal.SIGINT)}
    heartbeat = Heartbeat(registry, run_id, run_dir / "train_log.jsonl")
    try:
        if with_baseline and spec.eval.baseline and spec.eval.benchmarks:
            record_baseline(rs, registry, baseline_sweep, run_dir / "baseline")
        registry.set_status(run_id, "running")
        heartbeat.start()
        (run_dir / "error.txt").unlink(missing_ok=True)
        command = training_command(spec, run_dir / "spec.yaml", run_dir)
        print(f"launch ({resolve_backend(spec)}): {' '.join(command)}")
        code = run_training(command)
        _fold_outputs(registry, run_id, run_dir)
        if code != 0:
            error_file = run_dir / "error.txt"
            error = error_file.read_text().strip() if error_file.exists() else f"training exited with status {code}"
            registry.set_status(run_id, "failed", error=error)
            print(f"koe5-run: run {run_id} failed: {error}", file=sys.stderr)
            return EXIT_FAILED
        model_dir = run_dir / "model"
        registry.add_artifact(run_id, "model", str(model_dir))
        results = evaluate_and_record(registry, run_id, str(model_dir), spec, run_dir / "eval")
        if results:
            _update_model_card(model_dir, spec, rs.to_yaml(), run_dir, results)
        registry.set_status(run_id, "finished")
    except Killed as e:
        heartbeat.stopped.set()
        _fold_outputs(registry, run_id, run_dir)
        registry.set_status(run_id, "killed", error=str(e))
        print(f"koe5-run: run {run_id} killed ({e})", file=sys.stderr)
        return 128 + signal.SIGTERM
    except Exception as e:
        heartbeat.stopped.set()
        registry.set_status(run_id, "failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        # The heartbeat lasts through evaluation: a run that is still evaluating is alive, not crashed.
        # Wait for it to finish any registry write: a daemon thread still inside DuckDB when the
        # interpreter shuts down aborts the process ("FATAL: exception not rethrown", exit -6).
        heartbeat.stopped.set()
        if heartbeat.is_alive():
            heartbeat.join()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"\nrun id: {run_id}\nmodel:  {run_dir / 'model'}")
    return EXIT_OK


def check_data(spec) -> dict:
    """Before anything is recorded: read and tokenize every training source once, into the cache the ranks
    then map (a bad line stops the run here, naming file:line), and compare the training text with the
    evaluation queries (data.leakage)."""
    from koe5.data.dataset import load_training_data, source_name
    from koe5.data.leakage import find_leaks
    from koe5.eval.benchmark import load_benchmark

    data = load_training_data(spec)
    leaks = find_leaks(data, [load_benchmark(b.path, name=b.name) for b in spec.eval.benchmarks])
    total = sum(r["normalized"] for r in leaks.values())
    if total and spec.data.leakage != "ignore":
        detail = "; ".join(f"{name}: {r['normalized']} queries (e.g. {r['examples'][0]!r})"
                           for name, r in leaks.items() if r["normalized"])
        message = f"{total} evaluation queries also appear in the training data ({detail})"
        if spec.data.leakage == "error":
            raise ValueError(message + ". Remove them from the training data, or set data.leakage=warn.")
        print(f"koe5-run: warning: {message}; their metrics are inflated", file=sys.stderr)
    if data.skipped:
        print(f"koe5-run: warning: skipped bad training lines (data.on_error=skip): {data.skipped}", file=sys.stderr)
    return {"examples": dict(zip([source_name(s) for s in spec.data.sources], data.sizes)), "leakage": leaks,
            "skipped_lines": data.skipped}


def _fold_outputs(registry, run_id: str, run_dir: Path) -> None:
    log = run_dir / "train_log.jsonl"
    if log.exists():
        registry.fold_train_log(run_id, log)
    mix = run_dir / "data_mix.json"
    checks = run_dir / "data_checks.json"
    if mix.exists():
        data_mix = json.loads(mix.read_text())
        if checks.exists():  # what the sources hold and the leakage found, beside what was drawn
            data_mix["_checks"] = json.loads(checks.read_text())
        registry.set_data_mix(run_id, data_mix)


def evaluate_and_record(registry, run_id: str, model_path: str, spec, out_dir: Path) -> list:
    """Evaluate `model_path` on every benchmark of the spec and record the metrics under `run_id`."""
    import torch

    from koe5.eval.benchmark import load_benchmark
    from koe5.eval.model_eval import EncodeSettings, default_cache_dir, evaluate_encoder, format_table, record_results
    from koe5.encoder import load_encoder

    if not spec.eval.benchmarks:
        return []
    device = "cuda" if torch.cuda.is_available() and spec.train.device != "cpu" else "cpu"
    encoder = load_encoder(model_path, pooling=spec.model.pooling, normalize=spec.model.normalize, device=device)
    m = spec.model
    settings = EncodeSettings(m.query_prefix, m.passage_prefix, m.query_max_len, m.passage_max_len,
                              spec.eval.batch_size)
    benchmarks = [load_benchmark(b.path, name=b.name) for b in spec.eval.benchmarks]
    # A run launched with several processes encodes with as many; the search and metrics stay here.
    results = evaluate_encoder(encoder, benchmarks, spec.eval.k, settings, cache_dir=default_cache_dir(),
                               progress=True, nproc=spec.launch.nproc_per_node)
    record_results(registry, run_id, results, str(out_dir), model_path)
    print(format_table(results, spec.eval.k))
    return results


def record_baseline(rs, registry, sweep_id: str | None, out_dir: Path) -> str:
    """Evaluate the untrained model and record it as a run of kind `baseline`, beside the trained one."""
    spec = rs.spec
    run_id = registry.create_run(f"{spec.name}@init", rs.spec_hash, rs.to_yaml(), kind="baseline",
                                 status="running", tags=[*spec.tags, "init"], sweep_id=sweep_id,
                                 provenance=provenance(1, spec.train.device))
    print(f"baseline {run_id}: evaluating the untrained model {spec.model.name_or_path}")
    evaluate_and_record(registry, run_id, spec.model.name_or_path, spec, out_dir)
    registry.set_status(run_id, "finished")
    return run_id


def _update_model_card(model_dir: Path, spec, spec_yaml: str, run_dir: Path, results: list) -> None:
    from koe5.eval.model_eval import format_table
    from koe5.export import model_card

    mix_file = run_dir / "data_mix.json"
    mix = json.loads(mix_file.read_text()) if mix_file.exists() else {}
    card = model_card(name=spec.name, base_model=spec.model.name_or_path, spec_yaml=spec_yaml, data_mix=mix,
                      results_table="```\n" + format_table(results, spec.eval.k) + "\n```")
    (model_dir / "README.md").write_text(card, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
