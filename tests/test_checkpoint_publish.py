"""Publishing and pruning checkpoints is safe to interrupt and to repeat: whatever point a run is killed at,
latest.json names a complete checkpoint, and the resumed run (which repeats the steps after that checkpoint,
so publishes the same step numbers again) saves and finishes.

The unit tests drive the real `checkpoint.save` with a stand-in engine that writes one file, and inject the
crash by making one filesystem call raise: nothing in checkpoint.py catches it, so what is left on disk is
what a process killed at that call leaves. The last test does the same with a real training run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from koe5.launch import training_command
from koe5.spec import expand
from koe5.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "koe5" / "assets" / "ko_sample" / "train.jsonl"


class Crash(BaseException):
    """Raised where the process is killed (BaseException, so no `except Exception` could swallow it)."""


class FakeEngine:
    """What checkpoint.save needs of a DeepSpeed engine: it writes `weights.txt` holding `version`."""

    def __init__(self, version: str):
        self.version = version

    def save_checkpoint(self, save_dir, tag, save_latest):
        assert not save_latest
        d = Path(save_dir) / tag
        d.mkdir(parents=True)
        (d / "weights.txt").write_text(self.version)


def save(run_dir: Path, step: int, version: str, keep: int = 2) -> Path:
    return checkpoint.save(FakeEngine(version), run_dir, step, rank=0, world=1, spec_hash="h",
                           drawn={"examples": {}, "tokens": {}}, keep=keep)


def steps_on_disk(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in checkpoint.checkpoint_dir(run_dir).glob("step-*"))


def assert_complete(path: Path, step: int, version: str | None = None) -> None:
    assert sorted(p.name for p in path.iterdir()) == ["koe5.json", "rng-rank0.pt", "weights.txt"], path
    assert checkpoint.info(path)["step"] == step
    if version is not None:
        assert (path / "weights.txt").read_text() == version


def crash_when_latest_is_replaced(monkeypatch, tag: str) -> None:
    """Kill the publish of `tag` after its rename into place, just before latest.json is replaced."""
    real = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst).name == checkpoint.LATEST and json.loads(Path(src).read_text())["tag"] == tag:
            raise Crash
        real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)


def test_a_step_published_again_after_a_crash_between_rename_and_latest_json_replaces_the_stale_one(
        tmp_path, monkeypatch):
    """Catches `_publish` renaming onto an existing step-N (the original: OSError "Directory not empty" at
    every later publish of step N, so the resumed run dies at the same checkpoint forever) and one that keeps
    the stale directory instead of the one just written."""
    save(tmp_path, 4, "first")
    with monkeypatch.context() as m:
        crash_when_latest_is_replaced(m, "step-00000008")
        with pytest.raises(Crash):
            save(tmp_path, 8, "killed")
    root = checkpoint.checkpoint_dir(tmp_path)
    assert (root / "step-00000008" / "koe5.json").exists()  # renamed into place ...
    assert checkpoint.latest(tmp_path).name == "step-00000004"  # ... but not named: the resume starts at 4

    save(tmp_path, 8, "resumed")  # the resumed run repeats steps 4..7 and publishes step 8 again
    assert_complete(checkpoint.latest(tmp_path), 8, "resumed")
    assert steps_on_disk(tmp_path) == [4, 8]
    assert not (root / checkpoint.TRASH).exists()


def test_publish_refuses_to_replace_the_checkpoint_latest_json_names(tmp_path):
    """Catches a replace-if-exists `_publish` that does not check latest.json: it would delete the one
    checkpoint the run resumes from (and a crash before its rename would leave the run with none)."""
    save(tmp_path, 4, "first")
    with pytest.raises(FileExistsError, match="step-00000004"):
        save(tmp_path, 4, "again")
    assert_complete(checkpoint.latest(tmp_path), 4, "first")


def test_prune_keeps_the_checkpoint_latest_json_names_when_a_stale_newer_one_exists(tmp_path, monkeypatch):
    """A run killed after renaming step-8 into place resumes from step 4 with train.save_every changed (it is
    resume_safe) to 6, so step 8 is never published again. Catches a prune that keeps the `keep` newest
    step-* names whatever latest.json says (the original): with keep=1 it kept the stale step-8 and deleted
    step-6, which latest.json had just named, so the next crash would restart the run from step 0."""
    save(tmp_path, 4, "first", keep=1)
    with monkeypatch.context() as m:
        crash_when_latest_is_replaced(m, "step-00000008")
        with pytest.raises(Crash):
            save(tmp_path, 8, "killed", keep=1)
    save(tmp_path, 6, "resumed", keep=1)
    assert_complete(checkpoint.latest(tmp_path), 6, "resumed")
    assert steps_on_disk(tmp_path) == [6]  # step 4 pruned (keep=1), stale step 8 gone


def _instrument(monkeypatch, crash_at: int) -> list[str]:
    """Count the filesystem calls that change checkpoints/ (renames, os.replace, rmtree) and raise Crash at
    call number `crash_at`. A crash inside an rmtree first deletes half of the tree's files, as a kill in the
    middle of a deletion does."""
    calls: list[str] = []
    real_rename, real_replace, real_rmtree = os.rename, os.replace, shutil.rmtree

    def tick(what: str) -> bool:
        calls.append(what)
        return len(calls) - 1 == crash_at

    def rename(src, dst, *a, **k):
        if tick(f"rename {Path(src).name} -> {Path(dst).parent.name}/{Path(dst).name}"):
            raise Crash
        real_rename(src, dst, *a, **k)

    def replace(src, dst, *a, **k):
        if tick(f"replace {Path(dst).name}"):
            raise Crash
        real_replace(src, dst, *a, **k)

    def rmtree(path, *a, **k):
        if tick(f"rmtree {Path(path).name}"):
            files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else []
            for p in files[: max(1, len(files) // 2)] if files else []:
                p.unlink()
            raise Crash
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(os, "rename", rename)  # pathlib's Path.rename calls os.rename
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return calls


def test_a_crash_at_any_filesystem_call_of_save_leaves_a_resumable_run(tmp_path, monkeypatch):
    """The state before: checkpoints 4 and 8 published (keep=2), and a stale step-12 from an earlier attempt
    killed after its rename. The resumed attempt saves step 12 and is killed at each filesystem call in
    turn (clearing .partial/, replacing the stale step-12, the rename, latest.json, each prune deletion).
    After each kill: latest.json names a complete checkpoint, of the newest attempt at that step, and every
    step-* directory left is complete; resuming from it, the run saves its remaining checkpoints and ends
    with exactly the `keep` newest. Catches a torn step-* directory left by deleting in place (the original
    prune's rmtree), a publish that removes the old step-N after renaming the new one in (or any order that
    makes latest.json name a missing or torn directory), and every failure the tests above catch."""
    points = None
    for k in [-1, *range(10**6)]:  # -1: an uninterrupted save, to list its calls; then a crash at each
        if points is not None and k == len(points):
            break
        run_dir = tmp_path / f"crash{k}"
        save(run_dir, 4, "v4")
        save(run_dir, 8, "v8")
        with monkeypatch.context() as m:
            crash_when_latest_is_replaced(m, "step-00000012")
            with pytest.raises(Crash):
                save(run_dir, 12, "stale")
        with monkeypatch.context() as m:
            calls = _instrument(m, k)
            try:
                save(run_dir, 12, "v12")
                crashed = False
            except Crash:
                crashed = True
        if points is None:
            assert not crashed
            points = calls
        else:
            assert crashed, (k, calls)
        where = f"killed at call {k}: {points[k] if crashed else 'none'}"
        resumed_from = checkpoint.latest(run_dir)
        assert resumed_from is not None, where
        step = checkpoint.info(resumed_from)["step"]
        assert step in (8, 12), where
        assert_complete(resumed_from, step, f"v{step}")
        for s in steps_on_disk(run_dir):  # none torn (a stale step-12 is complete, just not trusted)
            assert_complete(checkpoint.checkpoint_dir(run_dir) / f"step-{s:08d}", s)

        for s in range(step + 4, 20, 4):  # the resumed run: its remaining checkpoints, no crash
            save(run_dir, s, f"v{s}")
        assert_complete(checkpoint.latest(run_dir), 16, "v16")
        assert steps_on_disk(run_dir) == [12, 16], where
        assert_complete(checkpoint.checkpoint_dir(run_dir) / "step-00000012", 12, "v12")
        assert not (checkpoint.checkpoint_dir(run_dir) / checkpoint.TRASH).exists(), where
    assert "replace latest.json" in points and len(points) >= 5, points  # the crashes covered the save


def test_a_training_run_killed_between_rename_and_latest_json_resumes_and_finishes(tmp_path):
    """A real one-rank run (DeepSpeed checkpoint files, the trainer's save/resume path) killed by
    tests/ranks/crash_on_publish.py after step-6 is renamed into place, before latest.json names it, then
    started again: it resumes from step 3, publishes step 6 a second time and finishes. Catches the
    original `_publish` (the second run failed with "Directory not empty")."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""
name: publish-again
seed: 3
model: {{name_or_path: "builtin:tiny-ko-bert", query_max_len: 24, passage_max_len: 64}}
data: {{sources: [{{path: {SAMPLE}}}], hard_negatives: 1}}
cache: {{chunk_size: 4}}
train: {{batch_size: 8, max_steps: 8, device: cpu, log_every: 1, save_every: 3, keep_checkpoints: 2}}
launch: {{nproc_per_node: 1}}
""", encoding="utf-8")
    rs = expand(spec, [])[0]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rs.freeze(run_dir / "spec.yaml")
    cmd = training_command(rs.spec, run_dir / "spec.yaml", run_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    crash = ROOT / "tests" / "ranks" / "crash_on_publish.py"
    proc = subprocess.run([sys.executable, str(crash), *cmd[cmd.index("--spec"):]], capture_output=True,
                          text=True, cwd=ROOT, timeout=600,
                          env={**env, "KOE5_CRASH_AT": "step-00000006", "KOE5_CRASH_POINT": "after_rename"})
    assert proc.returncode == 9, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (checkpoint.checkpoint_dir(run_dir) / "step-00000006" / "koe5.json").exists()  # renamed into place
    assert checkpoint.latest(run_dir).name == "step-00000003"  # not named

    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 3 of 8" in proc.stdout
    latest = checkpoint.latest(run_dir)
    assert latest.name == "step-00000006" and checkpoint.info(latest)["step"] == 6
    assert (latest / "rng-rank0.pt").exists() and (run_dir / "model" / "model.safetensors").exists()
    assert [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()] == \
        list(range(1, 9))
