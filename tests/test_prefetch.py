"""data.prefetch (issue 17, lever 4): batches built by a background thread are the batches the serial loop
builds, in the same order, so training ends with the same weights, from the start and after a resume
mid-epoch; an error raised where batches are built reaches the loop unchanged and stops the thread."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from koe5.data.errors import DataError
from koe5.data.prefetch import Prefetcher
from koe5.launch import training_command
from koe5.spec import expand
from koe5.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "koe5" / "assets" / "ko_sample" / "train.jsonl"


def prefetch_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "koe5-prefetch"]


@pytest.mark.parametrize("ahead", [0, 1, 3])
def test_items_come_in_step_order_from_any_first_step(ahead):
    made = []

    def make(step):
        made.append(step)
        return ("batch", step)

    with Prefetcher(make, range(5, 17), ahead) as items:
        assert list(items) == [("batch", s) for s in range(5, 17)]
    assert made == list(range(5, 17))  # each built once
    assert not prefetch_threads()


@pytest.mark.parametrize("ahead", [0, 2])
def test_an_error_building_a_batch_is_raised_in_the_loop_at_its_step(ahead):
    """The trainer's clear error for bad data is a DataError naming file:line; it must come through as it is,
    after the batches before it (which trained), and the thread must be gone once the loop has left."""
    def make(step):
        if step == 3:
            raise DataError("train.jsonl:7: field 'query': expected a string")
        return step

    got = []
    with pytest.raises(DataError, match=r"^train\.jsonl:7: field 'query'"):
        with Prefetcher(make, range(10), ahead) as items:
            for item in items:
                got.append(item)
    assert got == [0, 1, 2]
    assert not prefetch_threads()


def test_leaving_the_loop_early_stops_the_thread():
    """Early stopping (train.keep_best.patience) or an error in the step leaves the loop with the thread
    blocked on a full queue: leaving the `with` block must stop it, not leave it building batches."""
    made = []
    with Prefetcher(lambda s: made.append(s) or s, range(1000), 2) as items:
        for item in items:
            if item == 1:
                break
        assert prefetch_threads()
    assert not prefetch_threads()
    assert len(made) <= 2 + 2 + 1  # the two taken, the queue's two, and at most one waiting to go in


def test_negative_prefetch_is_a_spec_error(tmp_path):
    from koe5.spec import SpecError

    spec = write_spec(tmp_path)
    with pytest.raises(SpecError, match=r"data\.prefetch.*expected 0"):
        expand(spec, ["data.prefetch=-1"])


def write_spec(tmp: Path) -> Path:
    """Dropout on (so the RNG of the steps matters), a checkpoint mid-epoch (20 steps of 16 per epoch). Small:
    the machine these tests run on is shared, and a step of 64 took over a minute there."""
    spec = tmp / "spec.yaml"
    spec.write_text(f"""
name: prefetch-check
seed: 5
model: {{name_or_path: "builtin:tiny-ko-bert", dropout: 0.1, query_max_len: 16, passage_max_len: 32}}
data: {{sources: [{{path: {SAMPLE}}}], hard_negatives: 1}}
loss: {{temperature: 0.05}}
cache: {{chunk_size: 8, chunk_tokens: 128}}
train: {{batch_size: 16, max_steps: 4, lr: 1.0e-4, warmup_ratio: 0.25, device: cpu, log_every: 1, save_every: 2,
        keep_checkpoints: 1}}
""", encoding="utf-8")
    return spec


def train_run(tmp: Path, name: str, *overrides: str, rank_script: str | None = None, env: dict | None = None,
              check: bool = True) -> tuple[Path, subprocess.CompletedProcess]:
    rs = expand(write_spec(tmp), list(overrides))[0]
    run_dir = tmp / name
    run_dir.mkdir(exist_ok=True)
    rs.freeze(run_dir / "spec.yaml")
    cmd = training_command(rs.spec, run_dir / "spec.yaml", run_dir)
    if rank_script:
        cmd = [sys.executable, str(ROOT / "tests" / "ranks" / rank_script), *cmd[cmd.index("--spec"):]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1500,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc


def test_prefetch_trains_to_the_serial_weights_and_resumes_to_them(tmp_path):
    """4 steps (a checkpoint after step 2) with prefetch 0 and 3: the same weights. Then the prefetching run
    is started again on its own directory: it resumes from the checkpoint, its thread starts at step 2, and
    it must end with the same weights again."""
    serial, _ = train_run(tmp_path, "serial", "data.prefetch=0")
    ahead, _ = train_run(tmp_path, "ahead", "data.prefetch=3")
    want = load_file(serial / "model" / "model.safetensors")
    got = load_file(ahead / "model" / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)

    assert checkpoint.info(checkpoint.latest(ahead))["step"] == 2
    (ahead / "model" / "model.safetensors").unlink()
    _, proc = train_run(tmp_path, "ahead", "data.prefetch=3")
    assert "step 2 of 4" in proc.stdout  # it resumed rather than started again
    resumed = load_file(ahead / "model" / "model.safetensors")
    for name in want:
        torch.testing.assert_close(resumed[name], want[name], rtol=0, atol=1e-5, msg=name)


def test_a_data_error_in_the_prefetch_thread_is_the_clear_one_line_error(tmp_path):
    """The batch of step 2 fails to build in the thread (tests/ranks/fail_at_step.py): the rank exits with
    status 2 and the one-line message naming file:line, no traceback, and does not hang."""
    run_dir, proc = train_run(tmp_path, "fails", "data.prefetch=2", rank_script="fail_at_step.py",
                              env={"KOE5_FAIL_AT_STEP": "2"}, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"koe5: {SAMPLE}:3: field 'query'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (run_dir / "error.txt").read_text().startswith(f"{SAMPLE}:3:")
    # the steps before it trained, as on the serial path
    assert [line for line in (run_dir / "train_log.jsonl").read_text().splitlines()][-1].startswith('{"step": 2,')
