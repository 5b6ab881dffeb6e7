"""Checkpoints and exact resume: a 2-rank run killed after a checkpoint and started again ends with the
same weights as an uninterrupted run, and its training log has every step exactly once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from koe5.launch import training_command
from koe5.spec import expand
from koe5.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "koe5" / "assets" / "ko_sample" / "train.jsonl"
STEPS = 12


def make_run(tmp: Path, name: str, *overrides: str) -> tuple[list[str], Path]:
    """The launch command of a run directory holding the frozen spec (dropout on, so RNG restore matters)."""
    spec = tmp / "spec.yaml"
    if not spec.exists():
        spec.write_text(f"""
name: resume-check
seed: 3
model: {{name_or_path: "builtin:tiny-ko-bert", dropout: 0.1, query_max_len: 24, passage_max_len: 64}}
data: {{sources: [{{path: {SAMPLE}}}], hard_negatives: 1}}
loss: {{temperature: 0.05}}
cache: {{chunk_size: 2}}
train: {{batch_size: 8, max_steps: {STEPS}, lr: 1.0e-4, adam_eps: 1.0e-6, warmup_ratio: 0.25, device: cpu,
        log_every: 1, save_every: 4, keep_checkpoints: 2}}
launch: {{nproc_per_node: 2}}
""", encoding="utf-8")
    rs = expand(spec, list(overrides))[0]
    run_dir = tmp / name
    run_dir.mkdir()
    rs.freeze(run_dir / "spec.yaml")
    return training_command(rs.spec, run_dir / "spec.yaml", run_dir), run_dir


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "model" / "model.safetensors")


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path):
    cmd, reference = make_run(tmp_path, "reference")
    run(cmd)
    assert sorted(p.name for p in checkpoint.checkpoint_dir(reference).glob("step-*")) == \
        ["step-00000004", "step-00000008"]  # keep_checkpoints=2; none at the last step (the export is it)

    cmd, killed = make_run(tmp_path, "killed")
    # Its own session, so SIGKILL takes the launcher and both ranks at once, like a machine dying.
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while checkpoint.latest(killed) is None:
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists()
    resumed_from = checkpoint.info(checkpoint.latest(killed))["step"]
    assert 4 <= resumed_from < STEPS

    out = run(cmd)  # the same command again: it finds the checkpoint and resumes
    assert f"step {resumed_from} of {STEPS}" in out.stdout
    a, b = weights(reference), weights(killed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5, msg=name)
    assert logged_steps(killed) == list(range(1, STEPS + 1))


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_usable(tmp_path):
    """Kill the run between writing the step-8 checkpoint's files and publishing them."""
    cmd, run_dir = make_run(tmp_path, "torn", "launch.nproc_per_node=1", "cache.chunk_size=4")
    crash = ROOT / "tests" / "ranks" / "crash_on_publish.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KOE5_CRASH_AT": "step-00000008"}
    proc = subprocess.run([sys.executable, str(crash), *cmd[cmd.index("--spec"):]], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert (checkpoint.checkpoint_dir(run_dir) / ".partial" / "step-00000008").is_dir()  # written, not published
    assert checkpoint.latest(run_dir).name == "step-00000004"

    out = run(cmd)
    assert f"step 4 of {STEPS}" in out.stdout
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    assert not (checkpoint.checkpoint_dir(run_dir) / ".partial").exists() or \
        not any((checkpoint.checkpoint_dir(run_dir) / ".partial").iterdir())


def test_resuming_with_another_world_size_is_refused(tmp_path):
    cmd, run_dir = make_run(tmp_path, "one-rank", "launch.nproc_per_node=1", "cache.chunk_size=4",
                            "train.max_steps=5")
    run(cmd)  # checkpoint at step 4, then the export
    two_ranks = expand(tmp_path / "spec.yaml", ["train.max_steps=5"])[0]
    two_ranks.freeze(run_dir / "spec.yaml")
    proc = subprocess.run(training_command(two_ranks.spec, run_dir / "spec.yaml", run_dir), capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert proc.returncode != 0
    assert "written by 1 ranks, this run has 2" in (run_dir / "error.txt").read_text()
