"""The sampler is a pure function of the step: a resume mid-epoch draws exactly the batches an
uninterrupted run draws, and duplicate positives in one batch are masked by the loss, not resampled."""

import json
from pathlib import Path

import pytest
import torch

from koe5.data.dataset import load_training_data
from koe5.data.triples import text_key
from koe5.spec import expand

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"


def batch_ids(data, steps):
    """(source, row, positive, negatives) of every example: everything a step trains on."""
    out = []
    for s in steps:
        b = data.global_batch(s)
        out.append(list(zip(b.ids(), b.positive.tolist(), map(tuple, b.negatives.tolist()))))
    return out


@pytest.mark.parametrize("mixing", ["proportional", "weighted"])
def test_resume_mid_epoch_continues_the_sampler_exactly(mixing):
    rs = expand(QUICKSTART, [f"data.mixing={mixing}", "train.batch_size=16", "seed=7"])[0]
    uninterrupted = load_training_data(rs.spec)
    n = uninterrupted.steps_per_epoch
    stop = n + n // 2  # interrupted half-way through the second epoch
    full = batch_ids(uninterrupted, range(2 * n))
    resumed = batch_ids(load_training_data(rs.spec), range(stop, 2 * n))  # a fresh process after the resume
    assert resumed == full[stop:]
    assert full[:n] != full[n:]  # the epochs really are shuffled differently


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
