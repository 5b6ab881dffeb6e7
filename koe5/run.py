"""`koe5-run SPEC [key=value ...]`: spec -> run -> train -> evaluate -> record.

This process is the orchestrator and the registry's only writer for the run. This file is its command
line; each decision lives in one module of koe5/orchestrate/ (listed in its __init__): plan.py (dry run,
emit), checks.py (data, leakage, evaluation lengths), decide.py (skip, resume or start), lifecycle.py
(heartbeat, signals, folding outputs), evaluation.py (trained model and baseline, through
koe5/eval/model_eval.py) and execute.py (a run from queued to its final status). Training itself runs in
child processes that never open the registry.
"""

from __future__ import annotations

import argparse
import sys

from koe5.orchestrate import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK  # noqa: F401  (koe5-run's exit statuses)
from koe5.orchestrate.checks import check_data  # noqa: F401  (koe5.run.check_data, as tests and scripts use it)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="koe5-run", description="Validate an experiment spec, train, evaluate and record the run.")
    parser.add_argument("spec", nargs="?", help="experiment YAML (omit with --from-run or --resume)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="typed overrides, e.g. train.lr=1e-5")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved spec, its hash and the command")
    parser.add_argument("--json", action="store_true", help="with --dry-run: one JSON object (a list for sweeps)")
    parser.add_argument("--force", action="store_true", help="run even if this spec hash already finished")
    parser.add_argument("--from-run", metavar="RUN", help="re-run the resolved spec stored with RUN (an id, a unique id prefix or suffix, a run name or latest)")
    parser.add_argument("--resume", metavar="RUN", help="continue an interrupted RUN (named as for --from-run) from its newest checkpoint")
    parser.add_argument("--emit", choices=["slurm", "deepspeed", "torchrun"],
                        help="freeze the spec and print the job script (slurm) or launch command a cluster "
                             "user submits; runs nothing here")
    # Intermixed: options may come anywhere (`koe5-run spec.yaml --dry-run a=b` as well as before the spec).
    args = parser.parse_intermixed_args(argv)
    by_run = args.from_run or args.resume
    if args.spec and "=" in args.spec and not args.spec.endswith((".yaml", ".yml")) and by_run:
        args.overrides.insert(0, args.spec)  # `koe5-run --from-run X a=b`: the first override lands in spec
        args.spec = None
    if not args.spec and not by_run:
        parser.error("give a spec file, --from-run RUN or --resume RUN")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from koe5.orchestrate.execute import resume, run_one
    from koe5.orchestrate.plan import dry_run, emit, spec_from_run
    from koe5.spec import SpecError, expand

    if args.resume:
        from koe5.registry import Registry, RegistryError

        try:
            return resume(args.resume, Registry(), args.overrides)
        except RegistryError as e:
            print(f"koe5-run: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT

    try:
        spec_path = spec_from_run(args.from_run) if args.from_run else args.spec
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


if __name__ == "__main__":
    sys.exit(main())
