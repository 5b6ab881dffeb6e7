"""One run from start to end: a new run (`run_one`) or an interrupted one continued (`resume`), both ending
in `execute`: baseline, launch the ranks, fold their outputs in, evaluate, and a final status of
finished, failed or killed. Which of the two a spec gets is decided in decide.py."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from koe5.orchestrate import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from koe5.orchestrate.decide import checkpoint_step, decide, run_dir_of, unsafe_changes, why_not_resumable
from koe5.orchestrate.lifecycle import Heartbeat, Killed, fold_outputs, raise_if_killed, signals_raise_killed
from koe5.provenance import provenance


def run_one(rs, registry, sweep_id: str | None, force: bool) -> int:
    """Train `rs` as a new run, or resume the interrupted run of the same spec, or do nothing if it finished."""
    from koe5.orchestrate.checks import check_data, check_eval_lengths, check_model, check_trackers
    from koe5.preflight import preflight
    from koe5.spec.deepspeed import deepspeed_config
    from koe5.spec.schema import world_size

    spec = rs.spec
    decision = decide(registry, rs.spec_hash, force)
    if decision.action == "skip":
        run_id = decision.run["run_id"]
        print(f"koe5-run: spec {rs.spec_hash} already has a finished run, {run_id}; nothing to do "
              f"(use --force to train again, `koe5 show {run_id}` to see it)")
        return EXIT_OK
    if decision.action == "resume":
        run = decision.run
        print(f"koe5-run: spec {rs.spec_hash} has an interrupted run, {run['run_id']} ({run['status']}); "
              f"resuming it (use --force to start a new run instead)")
        return resume(run["run_id"], registry, [])

    problems = preflight(spec)
    if problems:
        print("koe5-run: cannot start here:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        check_trackers(spec)
        check_model(spec)
        checks = check_data(spec)
        check_eval_lengths(spec)
    except ValueError as e:  # TrackerError, ModelError, DataError, BenchmarkError, LengthError: they name the key
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


def resume(run: str, registry, overrides: list[str]) -> int:
    """Continue an interrupted run from its newest checkpoint, in the same run directory and run id.
    Overrides may only change keys marked resume-safe in the schema (logging, checkpointing, evaluation)."""
    from koe5.spec import SpecError, expand, load_frozen

    record = registry.get_run(run)
    run_id = record["run_id"]
    run_dir = run_dir_of(registry, record)
    step = checkpoint_step(run_dir) if record["kind"] == "train" else None
    refusal = why_not_resumable(record, step)
    if refusal:
        print(f"koe5-run: {refusal}", file=sys.stderr)
        return EXIT_BAD_INPUT
    frozen = run_dir / "spec.yaml"
    old = load_frozen(frozen)
    try:
        rs = expand(frozen, overrides)[0] if overrides else old
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return EXIT_BAD_INPUT
    unsafe = unsafe_changes(old.data, rs.data)
    if unsafe:
        lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in unsafe)
        print(f"koe5-run: cannot resume run {run_id} with a changed experiment; these keys change the training "
              f"itself:\n{lines}\nStart a new run instead (koe5-run --from-run {run_id} ...).", file=sys.stderr)
        return EXIT_BAD_INPUT
    from koe5.orchestrate.checks import check_trackers

    try:
        check_trackers(rs.spec)
    except ValueError as e:
        print(f"koe5-run: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if rs is not old:
        rs.freeze(frozen)
    registry.drop_train_log_after(run_id, step)
    print(f"run {run_id}: resuming from step {step} -> {run_dir}")
    # The baseline, if the spec asks for one, was evaluated when the run first started.
    return execute(rs, registry, run_id, run_dir, baseline_sweep=None, with_baseline=False)


def execute(rs, registry, run_id: str, run_dir: Path, *, baseline_sweep: str | None, with_baseline: bool) -> int:
    """Launch the ranks on the frozen spec in `run_dir`, then evaluate and record; the common path of a new
    run and a resumed one."""
    from koe5 import track
    from koe5.launch import resolve_backend, run_training, training_command
    from koe5.orchestrate.evaluation import evaluate_baseline, evaluate_trained, update_model_card
    from koe5.registry.commands import training_notes

    spec = rs.spec
    heartbeat = Heartbeat(registry, run_id, run_dir / "train_log.jsonl")
    with signals_raise_killed():
        try:
            baseline_id = None
            if with_baseline and spec.eval.baseline and spec.eval.benchmarks:
                baseline_id = evaluate_baseline(rs, registry, baseline_sweep, run_dir / "baseline")
                raise_if_killed()  # a signal whose exception an evaluation subprocess's fork swallowed
            registry.set_status(run_id, "running")
            track.start(spec, rs.spec_hash, run_dir)  # the ranks reopen the tracker runs; finish() below ends them
            heartbeat.start()
            (run_dir / "error.txt").unlink(missing_ok=True)
            command = training_command(spec, run_dir / "spec.yaml", run_dir)
            print(f"launch ({resolve_backend(spec)}): {' '.join(command)}")
            code = run_training(command, check_stop=raise_if_killed)
            fold_outputs(registry, run_id, run_dir)
            if code != 0:
                error_file = run_dir / "error.txt"
                error = error_file.read_text().strip() if error_file.exists() else f"training exited with status {code}"
                registry.set_status(run_id, "failed", error=error)
                track.finish(spec, run_dir, [], None, "failed")
                print(f"koe5-run: run {run_id} failed: {error}", file=sys.stderr)
                return EXIT_FAILED
            for note in training_notes(registry.get_run(run_id).get("train_summary")):
                print(note)  # evaluation time, the best step exported, an early stop
            model_dir = run_dir / "model"
            registry.add_artifact(run_id, "model", str(model_dir))
            results = evaluate_trained(registry, run_id, str(model_dir), spec, run_dir / "eval", baseline_id)
            raise_if_killed()
            if results:
                update_model_card(model_dir, spec, rs.to_yaml(), run_dir, results)
            # After the model card, so the artifact carries the results table.
            track.finish(spec, run_dir, results, model_dir, "finished")
            registry.set_status(run_id, "finished")
        except Killed as e:
            heartbeat.stop()
            fold_outputs(registry, run_id, run_dir)
            registry.set_status(run_id, "killed", error=str(e))
            track.finish(spec, run_dir, [], None, "killed")
            print(f"koe5-run: run {run_id} killed ({e})", file=sys.stderr)
            return 128 + signal.SIGTERM
        except Exception as e:
            heartbeat.stop()
            registry.set_status(run_id, "failed", error=f"{type(e).__name__}: {e}")
            track.finish(spec, run_dir, [], None, "failed")
            raise
        finally:
            # The heartbeat lasts through evaluation: a run that is still evaluating is alive, not crashed.
            heartbeat.stop()
    print(f"\nrun id: {run_id}\nmodel:  {run_dir / 'model'}")
    return EXIT_OK
