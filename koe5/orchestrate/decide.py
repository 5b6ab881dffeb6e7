"""What `koe5-run` does with a spec the registry has already seen, and whether a run may resume.

The rules, all here:
- Only training runs (kind `train`) decide. A baseline is an evaluation of the untrained model: it has its
  own identity (koe5/eval/model_eval.py) and finishing it says nothing about whether the spec trained. (It
  used to share the spec hash, and a run killed after its baseline was never resumed: "nothing to do".)
- A spec whose training run finished is not run again, unless --force.
- A training run that stopped before finishing (failed, killed or crashed) and left a checkpoint is resumed,
  in the same run id and directory, unless --force.
- On resume, only keys marked `resume_safe` in the schema may change, and the world size may not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# A run in one of these states stopped before it finished; with a checkpoint it can continue.
RESUMABLE = ("failed", "killed", "crashed")


@dataclass
class Decision:
    action: str  # "skip" (already finished), "resume" (interrupted, with a checkpoint) or "new"
    run: dict | None = None  # the training run skipped or resumed


def training_runs(registry, spec_hash: str) -> list[dict]:
    """This spec's training runs, oldest first; baselines and other evaluations are left out."""
    return [r for r in registry.find_runs(spec_hash) if r["kind"] == "train"]


def decide(registry, spec_hash: str, force: bool) -> Decision:
    if force:
        return Decision("new")
    runs = training_runs(registry, spec_hash)
    finished = [r for r in runs if r["status"] == "finished"]
    if finished:
        return Decision("skip", finished[-1])
    for run in reversed(runs):  # the newest interrupted run has the most recent checkpoint of this spec
        if run["status"] in RESUMABLE and checkpoint_step(run_dir_of(registry, run)) is not None:
            return Decision("resume", run)
    return Decision("new")


def run_dir_of(registry, record: dict) -> Path | None:
    full = registry.get_run(record["run_id"])
    return next((Path(a["path"]) for a in full["artifacts"] if a["kind"] == "run_dir"), None)


def checkpoint_step(run_dir: Path | None) -> int | None:
    """The step of the newest complete checkpoint in `run_dir`, or None without one."""
    from koe5.train import checkpoint

    latest = checkpoint.latest(run_dir) if run_dir else None
    return checkpoint.info(latest)["step"] if latest else None


def why_not_resumable(record: dict, step: int | None) -> str | None:
    """The one-line reason `record` cannot resume, or None when it can."""
    run_id = record["run_id"]
    if record["kind"] != "train":
        return f"run {run_id} is a {record['kind']} run; only a training run can be resumed"
    if record["status"] not in RESUMABLE:
        return f"run {run_id} is {record['status']}; only a failed, killed or crashed run can be resumed"
    if step is None:
        return (f"run {run_id} has no checkpoint to resume from (set train.save_every to write them); "
                f"start it again with `koe5-run --from-run {run_id} --force`")
    return None


def unsafe_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old, new) for every changed key that changes the training itself, which a resume refuses.
    The world size is among them (launch.nproc_per_node and launch.nnodes are not resume-safe)."""
    from koe5.spec.diff import diff
    from koe5.spec.introspect import resume_safe

    return [(k, a, b) for k, a, b in diff(old, new) if not resume_safe(k)]
