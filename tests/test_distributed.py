"""The trainer under DeepSpeed, on CPU with gloo, through the same launcher command koe5-run uses.

Every case trains 3 optimizer steps (fp32, dropout off) and compares the exported weights with a
reference run to 1e-5: GradCache chunk sizes against no cache, ZeRO stages against each other, and two
ranks with cross-device negatives against one process with the whole batch.

Different chunkings sum float32 gradients in different orders (~1e-7 relative). AdamW divides by
sqrt(v) + eps, so with the default eps of 1e-8 a weight whose gradient is pure rounding noise still takes
a full-size step whose sign is random; eps = 1e-6 keeps such weights still and leaves every real update
intact. The single-step gradient comparison in test_gradcache.py needs no such care.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from koe5.launch import training_command
from koe5.spec import expand

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "koe5" / "assets" / "ko_sample" / "train.jsonl"
WORK = None


def _data_with_duplicates(path: Path) -> Path:
    """32 triples where rows i and i+16 share their positive document and a few hard negatives copy
    their own positive, so duplicate masking has work to do in every batch."""
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:32]]
    for i in range(0, 16, 2):
        rows[i + 16]["document"] = rows[i]["document"]
    for i in (3, 11, 27):
        rows[i]["hard_negative"] = rows[i]["document"]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@functools.cache
def _workdir() -> Path:
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="koe5-dist-"))
    _data_with_duplicates(d / "train.jsonl")
    (d / "spec.yaml").write_text(f"""
name: dist-check
seed: 7
model: {{name_or_path: "builtin:tiny-ko-bert", dropout: 0.0, query_max_len: 24, passage_max_len: 64}}
data: {{sources: [{{path: {d / 'train.jsonl'}}}], hard_negatives: 1}}
loss: {{temperature: 0.05}}
train: {{batch_size: 8, max_steps: 3, lr: 1.0e-4, adam_eps: 1.0e-6, warmup_ratio: 0.0, scheduler: constant,
        device: cpu, log_every: 1}}
""", encoding="utf-8")
    return d


@functools.cache
def trained_weights(*overrides: str) -> dict[str, torch.Tensor]:
    work = _workdir()
    rs = expand(work / "spec.yaml", list(overrides))[0]
    run_dir = work / f"run-{rs.spec_hash}"
    if (run_dir / "model" / "model.safetensors").exists():  # the same spec written with other overrides
        return _trained(load_file(run_dir / "model" / "model.safetensors"))
    run_dir.mkdir(exist_ok=True)
    rs.freeze(run_dir / "spec.yaml")
    cmd = training_command(rs.spec, run_dir / "spec.yaml", run_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return _trained(load_file(run_dir / "model" / "model.safetensors"))


def _trained(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The exported weights koe5 trains: the export also carries the base model's pooler head (so loading
    reports no missing weights), which koe5 sets aside and never trains."""
    return {k: v for k, v in weights.items() if not k.startswith("pooler.")}


def run_dir(*overrides: str) -> Path:
    """The run directory trained_weights trains these overrides in (trained first if it was not)."""
    trained_weights(*overrides)
    return _workdir() / f"run-{expand(_workdir() / 'spec.yaml', list(overrides))[0].spec_hash}"


def train_log(*overrides: str) -> list[dict]:
    """The diagnostics rows (one per step: the workdir spec logs every step) of the run trained_weights made."""
    path = run_dir(*overrides) / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_weights(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=tol, msg=name)


def assert_trained(weights: dict) -> None:
    """Guard against vacuous equality: the weights moved away from the initial model."""
    from koe5.demo_model import build_demo_model

    init = load_file(build_demo_model() / "model.safetensors")
    moved = max((weights[k] - init[k]).abs().max().item() for k in init)
    assert moved > 2e-4  # 3 AdamW steps of lr 1e-4 move most weights by ~3e-4


@pytest.mark.parametrize("chunk", ["cache.chunk_size=1", "cache.chunk_size=3", "cache.chunk_size=8"])
def test_gradcache_chunk_sizes_match_uncached_training(chunk):
    reference = trained_weights("cache.enabled=false")
    assert_trained(reference)
    assert_same_weights(trained_weights(chunk), reference)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_stage_0_with_gradcache(stage):
    two_ranks = ("launch.nproc_per_node=2", "cache.chunk_size=3")
    reference = trained_weights(*two_ranks, "deepspeed.zero_stage=0")
    assert_same_weights(trained_weights(*two_ranks, f"deepspeed.zero_stage={stage}"), reference)


@pytest.mark.parametrize("variant", [
    ("deepspeed.zero_stage=3", "cache.chunk_tokens=96"),  # per-rank chunk counts differ: empty chunks pad
    ("deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"),
    ("deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true"),
    ("train.gradient_checkpointing=true",),
    ("loss.name=symmetric_infonce", "cache.enabled=false"),
    ("launch.backend=torchrun",),  # torchrun starts the same ranks as DeepSpeed's launcher
    # unpadded attention (koe5/attention.py) under ZeRO-3 with uneven token-budget chunks
    ("model.attention=varlen", "deepspeed.zero_stage=3", "cache.chunk_tokens=96"),
    # issue 17's levers all on (prefetch thread, compiled backbone, token chunks whose counts differ per rank)
    ("data.prefetch=2", "train.compile=true", "deepspeed.zero_stage=2", "cache.chunk_tokens=96"),
])
def test_training_variants_match_their_reference(variant):
    two_ranks = ("launch.nproc_per_node=2", "cache.chunk_size=3")
    symmetric = ("loss.name=symmetric_infonce",) if "loss.name=symmetric_infonce" in variant else ()
    reference = trained_weights(*two_ranks, *symmetric)
    assert_same_weights(trained_weights(*two_ranks, *variant), reference)


def test_token_budget_case_really_has_uneven_chunk_counts():
    """The chunk_tokens=96 variant above exercises empty-chunk padding only if ranks disagree somewhere."""
    from koe5.data.batches import rank_slice
    from koe5.data.dataset import load_training_data
    from koe5.train.gradcache import make_chunks

    spec = expand(_workdir() / "spec.yaml", ["launch.nproc_per_node=2", "cache.chunk_size=3",
                                             "cache.chunk_tokens=96"])[0].spec
    data = load_training_data(spec)
    counts = set()
    for step in range(3):
        batch = data.global_batch(step)
        per_rank = []
        for rank in range(2):
            _, docs, _, _ = data.collate(rank_slice(batch, rank, 2), torch.device("cpu"))
            per_rank.append(len(make_chunks(docs, 3, 96)))
        counts.add(tuple(per_rank))
    assert any(a != b for a, b in counts)


@pytest.mark.parametrize("mask", ["loss.mask_duplicates=true", "loss.mask_duplicates=false"])
def test_two_ranks_with_cross_device_negatives_match_one_process(mask):
    one = trained_weights("cache.chunk_size=3", mask)
    two = trained_weights("launch.nproc_per_node=2", "cache.chunk_size=3", mask)
    assert_trained(one)
    assert_same_weights(two, one)
    # The weights alone would hide a wrong gradient scale (AdamW divides it out, clipping caps it): the
    # gradient norms DeepSpeed hands the optimizer must match too, step by step. Catches a cross-device
    # gradient scaled by anything but world_size (measured: halving it passes the weight check above).
    norms_one = [row["grad_norm"] for row in train_log("cache.chunk_size=3", mask)]
    norms_two = [row["grad_norm"] for row in train_log("launch.nproc_per_node=2", "cache.chunk_size=3", mask)]
    assert len(norms_one) == 3 and all(n > 0 for n in norms_one)
    assert norms_two == pytest.approx(norms_one, rel=1e-4)


# Guided false-negative filtering with the base model itself as the guide (the model drifts from it as it
# trains). Exact duplicates tie with the positive in the guide's eyes, where rounding could flip a mask
# between chunkings; duplicate masking (on by default) takes them out first.
GUIDE = ("loss.guide_model=builtin:tiny-ko-bert",)


@pytest.mark.parametrize("variant", [
    ("cache.chunk_size=3",),
    ("launch.nproc_per_node=2", "cache.chunk_size=3", "deepspeed.zero_stage=0"),
    ("launch.nproc_per_node=2", "cache.chunk_size=3", "deepspeed.zero_stage=2"),
    ("launch.nproc_per_node=2", "cache.chunk_size=3", "cache.chunk_tokens=96", "deepspeed.zero_stage=3"),
], ids=["1-rank-cached", "2-ranks-zero0", "2-ranks-zero2", "2-ranks-zero3-uneven-chunks"])
def test_guided_training_matches_one_uncached_process(variant):
    """loss.guide_model: GradCache, ZeRO 0/2/3 and two ranks with cross-device negatives (the guide's
    embeddings gathered like the model's) take the steps one uncached process takes with the whole batch."""
    reference = trained_weights(*GUIDE, "cache.enabled=false")
    assert_trained(reference)
    assert_same_weights(trained_weights(*GUIDE, *variant), reference)
    norms = [row["grad_norm"] for row in train_log(*GUIDE, *variant)]
    assert norms == pytest.approx([row["grad_norm"] for row in train_log(*GUIDE, "cache.enabled=false")], rel=1e-4)


def test_guided_symmetric_loss_on_two_ranks_matches_one_process():
    """symmetric_infonce with the guide also masking queries (document -> query direction)."""
    symmetric = ("loss.name=symmetric_infonce", "loss.guide_margin=0.02")
    reference = trained_weights(*GUIDE, *symmetric, "cache.enabled=false")
    assert_same_weights(trained_weights(*GUIDE, *symmetric, "launch.nproc_per_node=2", "cache.chunk_size=3",
                                        "deepspeed.zero_stage=3"), reference)


def test_guide_masks_candidates_and_changes_training():
    """The guide really masks (the log says how many candidates per query) and so trains differently."""
    rows = train_log(*GUIDE, "cache.enabled=false")
    assert all(0 < row["guide_masked"] and 0 < row["guide_masked_frac"] < 1 for row in rows)
    assert "guide_masked" not in train_log("cache.enabled=false")[0]  # only logged with a guide
    guided, plain = trained_weights(*GUIDE, "cache.enabled=false"), trained_weights("cache.enabled=false")
    assert max((guided[k] - plain[k]).abs().max().item() for k in guided) > 1e-5


MATRYOSHKA = ("loss.matryoshka_dims=[128, 64, 16]", "loss.matryoshka_weights=[1, 0.5, 2]")  # the demo model: 128


@pytest.mark.parametrize("variant", [
    ("cache.chunk_size=3",),
    ("launch.nproc_per_node=2", "cache.chunk_size=3", "cache.chunk_tokens=96", "deepspeed.zero_stage=3"),
], ids=["1-rank-cached", "2-ranks-zero3-uneven-chunks"])
def test_matryoshka_training_matches_one_uncached_process(variant):
    """loss.matryoshka_dims: cached, ZeRO-3 and two ranks take the steps one uncached process takes."""
    reference = trained_weights(*MATRYOSHKA, "cache.enabled=false")
    assert_trained(reference)
    assert_same_weights(trained_weights(*MATRYOSHKA, *variant), reference)
    plain = trained_weights("cache.enabled=false")
    assert max((reference[k] - plain[k]).abs().max().item() for k in plain) > 1e-5  # the widths change training


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="POSIX shared memory lives in /dev/shm on Linux")
def test_ranks_leave_no_shared_memory_behind():
    """DeepSpeed's CPU backend creates a 66 MB /dev/shm segment per rank and never removes it; before koe5
    unlinked them, every two-rank run kept 132 MB of RAM until CI was killed for memory."""
    segments = lambda: set(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"))  # noqa: E731
    before = segments()
    trained_weights("launch.nproc_per_node=2", "cache.chunk_size=4", "train.max_steps=1")  # a run no other test makes
    assert segments() - before == set()


def test_duplicate_masking_changes_training():
    on = trained_weights("cache.chunk_size=3", "loss.mask_duplicates=true")
    off = trained_weights("cache.chunk_size=3", "loss.mask_duplicates=false")
    assert max((on[k] - off[k]).abs().max().item() for k in on) > 1e-5


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_gradients_are_reduced_once_per_step_not_once_per_chunk(stage, tmp_path):
    """ZeRO 0/1: no gradient collective inside any chunk's backward; the reduction happens in step().
    ZeRO 2 reduce-scatters partitions during backward by design (its result equals ZeRO 0's, tested
    above); it is here to show that the counter does see collectives inside backward."""
    rs = expand(_workdir() / "spec.yaml", ["launch.nproc_per_node=2", "cache.chunk_size=1",
                                           f"deepspeed.zero_stage={stage}"])[0]
    rs.freeze(tmp_path / "spec.yaml")
    from koe5.launch import free_port

    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "ranks" / "count_reductions.py"), str(tmp_path / "spec.yaml"), str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = json.loads((tmp_path / "out.json").read_text())
    assert counts["backward_calls"] == 2 * (4 + 8)  # 2 steps x (4 query + 8 document chunks of one row)
    if stage == 2:
        assert counts["backward"] > 0
        return
    assert counts.get("backward", 0) == 0
    assert counts["step"] >= 2  # at least one reduction per step, none per chunk


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_bf16_gradients_accumulate_in_float32_under_deepspeed(stage, tmp_path):
    """train.precision=bf16 through the real engine hands the optimizer the same gradients as the plain
    module with float32 .grad accumulation, at one backward per row. Catches DeepSpeed's own bf16 mode,
    which summed GradCache's per-chunk gradients in bf16 (ZeRO-0's unfused optimizer, ZeRO-2's bf16
    buffer): those differ here by 0.15 relative (measured at ZeRO 0 and 2). test_gradcache.py shows the float32 sum is as close to
    the fp32 reference as an uncached bf16 step."""
    rs = expand(_workdir() / "spec.yaml", ["train.precision=bf16", "cache.chunk_size=1", "train.grad_clip=null",
                                           f"deepspeed.zero_stage={stage}"])[0]
    rs.freeze(tmp_path / "spec.yaml")
    cmd = [sys.executable, str(ROOT / "tests" / "ranks" / "bf16_grads.py"), str(tmp_path / "spec.yaml"),
           str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["backward_calls"] == 8 + 16
    assert out["weights_dtype"] == "torch.float32"  # the master weights are what trains and exports
    assert out["rel_diff"] < 1e-5


@pytest.mark.parametrize("stage", [0, 3])
def test_frozen_word_embeddings_stay_fixed_while_the_rest_trains(stage):
    """train.freeze_embeddings keeps the word-embedding matrix at its initial values, on one process and on
    two ZeRO-3 ranks alike, while every other weight trains as usual. Catches the key being ignored (seen:
    the rows then move at both stages) and a frozen run that trains differently once ZeRO-3 partitions it."""
    from koe5.model import resolve_model_path

    initial = load_file(Path(resolve_model_path("builtin:tiny-ko-bert")) / "model.safetensors")
    ranks = ("launch.nproc_per_node=2",) if stage == 3 else ()
    frozen = trained_weights("train.freeze_embeddings=true", f"deepspeed.zero_stage={stage}", "cache.chunk_size=3",
                             *ranks)
    name = next(n for n in frozen if n.endswith("word_embeddings.weight"))
    assert torch.equal(frozen[name], initial[name])
    moved = [n for n in frozen if n != name and not torch.equal(frozen[n], initial[n])]
    assert len(moved) > len(frozen) // 2, "the rest of the model did not train"
    trained = trained_weights("cache.chunk_size=3")
    assert not torch.equal(trained[name], initial[name])  # without the key, the same run moves them
    if stage == 3:  # and the frozen run is the same on two ZeRO-3 ranks as on one process
        assert_same_weights(frozen, trained_weights("train.freeze_embeddings=true", "cache.chunk_size=3"))
