"""A resume mid-epoch trains on exactly the batches an uninterrupted run trains on (checked on what the real
trainer draws, not on the sampler alone), and duplicate positives in one batch are masked by the loss, not
resampled."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from koe5.data.dataset import load_training_data
from koe5.data.triples import text_key
from koe5.launch import training_command
from koe5.spec import expand
from koe5.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"
SAMPLE = ROOT / "koe5" / "assets" / "ko_sample" / "train.jsonl"


STEPS_PER_EPOCH = 5  # the 320 sample triples in batches of 64
SAVE_AT = 7          # epoch 1, batch 2: a resume mid-way through the second epoch
STEPS = 9


def recorded(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("sampling", ["data.mixing=proportional", "data.mixing=weighted",
                                      "data.one_source_per_batch=true"])
def test_a_resumed_run_trains_on_the_batches_an_uninterrupted_run_trains_on(tmp_path, sampling):
    """The real trainer (tests/ranks/record_batches.py records every batch it draws) runs 9 steps with a
    checkpoint after step 7; a fresh process started on the same run directory resumes from that checkpoint
    (checkpoint.latest -> load -> the recorded step -> data.global_batch, the trainer's own path) and must
    draw exactly the uninterrupted run's batches 7 and 8, (source, row, positive, hard negatives) each.
    The first process went on past the checkpoint, so its batches 7 and 8 are an uninterrupted run's.
    Catches an off-by-one in the step a checkpoint records or the step the trainer resumes at (one batch
    trained twice or skipped), and any sampler state that a fresh process does not rebuild from the step
    alone (a cached permutation of the wrong epoch, the positive or negatives chosen by a counter)."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""
name: resume-batches
seed: 7
model: {{name_or_path: "builtin:tiny-ko-bert", query_max_len: 16, passage_max_len: 32}}
data: {{sources: [{{path: {SAMPLE}}}], hard_negatives: 1, positive: sample}}
cache: {{chunk_size: 32}}
train: {{batch_size: 64, max_steps: {STEPS}, device: cpu, log_every: 1, save_every: {SAVE_AT}, keep_checkpoints: 1}}
launch: {{nproc_per_node: 1}}
""", encoding="utf-8")
    rs = expand(spec, [sampling])[0]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rs.freeze(run_dir / "spec.yaml")
    cmd = training_command(rs.spec, run_dir / "spec.yaml", run_dir)
    rank = [sys.executable, str(ROOT / "tests" / "ranks" / "record_batches.py"), *cmd[cmd.index("--spec"):]]

    def train(record: Path) -> str:
        proc = subprocess.run(rank, capture_output=True, text=True, cwd=ROOT, timeout=600,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "KOE5_RECORD_BATCHES": str(record)})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    train(tmp_path / "uninterrupted.jsonl")
    full = recorded(tmp_path / "uninterrupted.jsonl")
    assert [r["step"] for r in full] == list(range(STEPS))
    assert checkpoint.info(checkpoint.latest(run_dir))["step"] == SAVE_AT

    out = train(tmp_path / "resumed.jsonl")
    resumed = recorded(tmp_path / "resumed.jsonl")
    # SAVE_AT, not the checkpoint's recorded step: the checkpoint holds the first SAVE_AT optimizer steps,
    # whatever number it records, so the resumed run must start with the uninterrupted run's batch SAVE_AT.
    assert [r["batch"] for r in resumed] == [r["batch"] for r in full[SAVE_AT:]]
    assert f"step {SAVE_AT} of {STEPS}" in out  # it did resume (rather than start again)
    assert full[0]["batch"] != full[STEPS_PER_EPOCH]["batch"]  # the epochs really are drawn differently


def test_duplicate_positives_in_a_batch_are_masked_not_scored_as_negatives():
    """Rows 0 and 2 share a positive up to whitespace and case: the loss must equal InfoNCE computed
    by hand with each one's copy of the other's positive left out of its candidates."""
    from koe5.train.loss import contrastive_loss

    positives = ["서울의 인구", "부산 항구", "  서울의   인구 ", "대구 날씨"]
    ids = torch.tensor([text_key(t) for t in positives])
    assert ids[0] == ids[2] and len(set(ids.tolist())) == 3
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    d = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    tau = 0.05
    scores = q @ d.T / tau
    expected = 0.0
    for i in range(4):
        keep = [j for j in range(4) if j == i or ids[j] != ids[i]]
        expected += -torch.log_softmax(scores[i, keep], 0)[keep.index(i)]
    got = contrastive_loss(q, d, ids, temperature=tau, mask_duplicates=True, cross_device=False).loss
    assert got == pytest.approx(float(expected) / 4, rel=1e-5)
    unmasked = contrastive_loss(q, d, ids, temperature=tau, mask_duplicates=False, cross_device=False).loss
    assert unmasked != pytest.approx(got, rel=1e-5)


def test_on_error_skip_leaves_bad_lines_out_and_counts_them(tmp_path):
    from koe5.run import check_data

    good = [json.dumps({"query": f"질문 {i}", "document": f"문서 {i}", "hard_negative": f"오답 {i}"},
                       ensure_ascii=False) for i in range(40)]
    bad = ['{"query": "q"', '{"query": "q", "hard_negative": "n"}', '{"query": 5, "document": "d", "hard_negative": "n"}']
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(("\n".join(good[:20] + bad + good[20:]) + "\n").encode() + b'{"query": "caf\xe9"}\n')
    spec = expand(QUICKSTART, [f"data.sources[0].path={path}", "data.on_error=skip"])[0].spec
    data = load_training_data(spec)
    assert data.sizes == [40] and data.skipped == {str(path): 4}
    assert check_data(spec)["skipped_lines"] == {str(path): 4}  # what the run records under data_mix._checks
    strict = expand(QUICKSTART, [f"data.sources[0].path={path}"])[0].spec
    with pytest.raises(ValueError, match=f"{path}:21"):
        load_training_data(strict)


def test_rows_without_negatives_train_on_other_rows_positives_of_their_source(tmp_path):
    """A source with no negatives (MS MARCO-ko, STS, paraphrases) mixed with one that has them: every example
    still gets data.hard_negatives negatives, so the batch layout (and cross-device gathering) holds. Its
    negatives are positives of other rows of the same source (never its own), the same for the same
    (seed, epoch, example) and different across epochs; the other source keeps its own negatives."""
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({"query": f"질문 {i}", "document": f"문서 {i}"}, ensure_ascii=False) + "\n"
                            for i in range(40)), encoding="utf-8")
    spec = expand(QUICKSTART, [f"data.sources[0].path={SAMPLE}",
                               f'data.sources[1]={{"path": "{bare}", "fields": {{"hard_negative": null}}}}',
                               "data.hard_negatives=2", "train.batch_size=40", "cache.chunk_size=8"])[0].spec
    data = load_training_data(spec)
    bare_k = data.names.index("bare.jsonl")
    first_positive = data.sources[bare_k].positives_of_rows()
    seen_epochs = [{}, {}]
    for step in range(2 * data.steps_per_epoch):
        batch = data.global_batch(step)
        mine = batch.source == bare_k
        negatives = batch.negatives[mine]
        assert negatives.shape[1] == 2
        assert set(negatives.ravel().tolist()) <= set(first_positive.tolist())  # positives of its rows ...
        assert not (negatives == first_positive[batch.row[mine]][:, None]).any()  # ... never its own
        sample = data.sources[1 - bare_k]
        own, rows = batch.negatives[~mine], batch.row[~mine]
        starts = sample.rows_docs[rows] + sample.rows_npos[rows]
        assert ((own >= starts[:, None]) & (own < sample.rows_docs[rows + 1][:, None])).all()
        if step in (0, data.steps_per_epoch):
            assert np.array_equal(load_training_data(spec).global_batch(step).negatives, batch.negatives)
        seen = seen_epochs[step // data.steps_per_epoch]
        seen.update(zip(batch.row[mine].tolist(), map(tuple, negatives.tolist())))
    common = set(seen_epochs[0]) & set(seen_epochs[1])
    assert common and any(seen_epochs[0][r] != seen_epochs[1][r] for r in common)
