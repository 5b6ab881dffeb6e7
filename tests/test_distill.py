"""Score distillation from stored teacher scores (`loss.distill_weight`, a source's `fields.scores`).

- the loss and gradients of a koe5 step equal a plain full-batch implementation written here (a loop over
  queries, the KL formula written out), cached or not, with rows and candidates the teacher did not score,
  alongside symmetric_infonce, the guide and Matryoshka; and sentence-transformers' DistillKLDivLoss added
  to MultipleNegativesRankingLoss, where the definitions match (koe5 does not multiply by tau^2);
- 3 steps of training at ZeRO 0, 2 and 3 on 2 ranks with cross-device negatives equal one uncached
  process with the whole batch (the machinery of test_distributed.py);
- the reader: the scores of a JSONL or CSV source reach each example of a batch in the order of its
  documents, follow the negative an epoch takes, and are NaN for negatives borrowed from other rows or
  mined; a bad value names file:line;
- the spec checks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from koe5.model import EmbeddingModel, resolve_model_path
from koe5.spec import SpecError, expand
from koe5.train.loss import DistillConfig, GuideConfig, MatryoshkaConfig
from koe5.train.step import StepConfig, train_step
from test_gradcache import PlainEngine, grads_of, random_batch, reference_loss, tiny_model

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"
SAMPLE = ROOT / "koe5" / "assets" / "ko_sample" / "train.jsonl"
NAN = float("nan")


# ---------------------------------------------------------------- the loss against plain references

def reference_kl(q, d, teacher, tau, teacher_tau):
    """mean over queries with >= 2 scored candidates of KL(p || q) over the query's own scored documents,
    one query at a time: p = softmax(teacher / T), q = softmax(q . d / tau)."""
    b = q.shape[0]
    n = d.shape[0] // b - 1
    terms = []
    for i in range(b):
        docs = [i] + [b + i * n + j for j in range(n)]
        keep = [k for k in range(1 + n) if not math.isnan(teacher[i, k])]
        if len(keep) < 2:
            continue
        student = torch.stack([q[i] @ d[docs[k]] for k in keep]) / tau
        p = torch.softmax(teacher[i, keep] / teacher_tau, dim=0)
        terms.append((p * (p.log() - torch.log_softmax(student, dim=0))).sum())
    return torch.stack(terms).mean()


def random_teacher(b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Scores with holes: query 1 lacks one negative's score, query 3 has only its positive's (left out of
    the KL term), query 4 none at all (a source without scores)."""
    t = torch.randn(b, 1 + n, generator=gen) * 2
    t[1, 2] = NAN
    t[3, 1:] = NAN
    t[4, :] = NAN
    return t


VARIANTS = {
    "plain": dict(),
    "guided-matryoshka": dict(guide=GuideConfig(0.01, "relative"),
                              matryoshka=MatryoshkaConfig((32, 8), (1.0, 0.5))),
}


@pytest.mark.parametrize("loss_name", ["infonce", "symmetric_infonce"])
@pytest.mark.parametrize("chunking", [dict(chunk_size=1), dict(chunk_size=4), dict(chunk_tokens=60),
                                      dict(cache=False)])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_distilled_loss_matches_full_batch_backprop(loss_name, chunking, variant):
    """The contrastive loss plus w x the KL mean, through GradCache's chunks (or uncached), gives the
    full-batch loss and gradients; unscored candidates and rows are left out; with the guide and
    Matryoshka the KL is taken at every width with that width's weight."""
    gen = torch.Generator().manual_seed(2)
    b, n_neg, tau, w, teacher_tau = 6, 2, 0.05, 0.7, 0.5
    queries, docs = random_batch(b, 12, gen), random_batch(b * (1 + n_neg), 20, gen)
    doc_ids = torch.arange(b * (1 + n_neg))
    doc_ids[9] = doc_ids[2]  # a duplicate: masked in the contrastive term, still scored in the KL
    teacher = random_teacher(b, n_neg, gen)
    opts = VARIANTS[variant]
    symmetric = loss_name == "symmetric_infonce"
    guide_model = tiny_model(seed=100).eval() if "guide" in opts else None

    ref = tiny_model(seed=2)
    q, d = ref(**queries), ref(**docs)
    g = None
    if guide_model is not None:
        with torch.no_grad():
            g = (guide_model(**queries), guide_model(**docs), opts["guide"])
    m = opts.get("matryoshka")
    levels = [(None, 1.0)] if m is None else list(zip(m.dims, m.weights))
    loss, kl_widest = 0.0, None
    for dim, weight in levels:
        qk, dk = (q, d) if dim is None else (F.normalize(q[:, :dim], dim=-1), F.normalize(d[:, :dim], dim=-1))
        kl = reference_kl(qk, dk, teacher, tau, teacher_tau)
        loss = loss + weight * (reference_loss(qk, dk, doc_ids, tau, symmetric, True, guide=g) + w * kl)
        kl_widest = kl if kl_widest is None else kl_widest
    loss.backward()
    want = grads_of(ref)

    model = tiny_model(seed=2)
    cfg = StepConfig(loss_name=loss_name, temperature=tau, distill=DistillConfig(w, teacher_tau),
                     **{"chunk_size": 3, **opts, **chunking})
    result = train_step(PlainEngine(model), queries, docs, doc_ids, cfg, torch.device("cpu"),
                        guide_model=guide_model, teacher_scores=teacher)
    got = grads_of(model)

    assert w * kl_widest.item() > 1e-2  # the KL term is a real part of the loss
    assert result.loss == pytest.approx(loss.item(), abs=1e-5)
    assert result.distill_kl == pytest.approx(kl_widest.item(), rel=1e-5)
    assert result.distill_frac == pytest.approx(4 / 6)  # queries 3 and 4 are not in the KL term
    assert want.keys() == got.keys() and len(want) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


def test_a_batch_without_teacher_scores_trains_as_without_distillation():
    """Rows of sources without scores are simply not in the KL term: the loss and gradients are the
    contrastive ones, and the log says no query was scored."""
    gen = torch.Generator().manual_seed(3)
    queries, docs, doc_ids = random_batch(4, 10, gen), random_batch(12, 16, gen), torch.arange(12)
    grads, results = [], []
    for distill, teacher in ((None, None), (DistillConfig(1.0), torch.full((4, 3), NAN))):
        model = tiny_model(seed=3)
        results.append(train_step(PlainEngine(model), queries, docs, doc_ids,
                                  StepConfig(temperature=0.05, chunk_size=2, distill=distill), torch.device("cpu"),
                                  teacher_scores=teacher))
        grads.append(grads_of(model))
    assert results[1].loss == pytest.approx(results[0].loss, abs=1e-7)
    assert results[1].distill_frac == 0 and results[0].distill_kl is None
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0)


def test_teacher_scores_and_the_config_go_together():
    gen = torch.Generator().manual_seed(0)
    queries, docs = random_batch(2, 8, gen), random_batch(4, 8, gen)
    with pytest.raises(ValueError, match="teacher_scores"):
        train_step(PlainEngine(tiny_model()), queries, docs, torch.arange(4),
                   StepConfig(distill=DistillConfig(1.0)), torch.device("cpu"))


@pytest.mark.parametrize("tau,teacher_tau,weight", [(0.05, 1.0, 0.3), (0.1, 0.2, 2.0)])
def test_distilled_loss_equals_sentence_transformers(tau, teacher_tau, weight):
    """infonce + w x KL is MultipleNegativesRankingLoss + w / tau^2 x DistillKLDivLoss (cosine scores,
    student_temperature=tau, teacher_temperature=T): sentence-transformers multiplies its KL by the student
    temperature squared (Hinton's factor), koe5 does not."""
    from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss, MultipleNegativesRankingLoss
    from sentence_transformers.util import pairwise_cos_sim

    from test_loss_options import koe5_inputs, sample_batch, st_model

    model = st_model(resolve_model_path("builtin:tiny-ko-bert"))
    anchors, positives, negatives = sample_batch(model, 8)
    labels = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    mnrl = MultipleNegativesRankingLoss(model, scale=1 / tau)
    kd = DistillKLDivLoss(model, similarity_fct=pairwise_cos_sim, student_temperature=tau,
                          teacher_temperature=teacher_tau)
    features = [anchors, positives, negatives]
    contrastive = mnrl(features, None)
    want_loss = contrastive + weight / tau ** 2 * kd(features, labels)
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    queries, docs = koe5_inputs(anchors, positives, negatives)
    cfg = StepConfig(loss_name="infonce", temperature=tau, cache=True, chunk_size=3,
                     distill=DistillConfig(weight, teacher_tau))
    result = train_step(PlainEngine(EmbeddingModel(model[0].auto_model, "mean", True)), queries, docs,
                        torch.arange(16), cfg, torch.device("cpu"), teacher_scores=labels)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    assert want_loss.item() - contrastive.item() > 1e-3  # the KL term is part of the loss
    assert result.loss == pytest.approx(want_loss.item(), rel=1e-5)
    assert want.keys() == got.keys() and len(want) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------- training: ZeRO stages and two ranks

def _scored_sources(work: Path) -> tuple[Path, Path]:
    """24 scored rows (3, 1 or no hard negatives each: the last borrow other rows' positives, unscored) and
    8 rows of a source without scores, written once into the distributed tests' work directory."""
    scored, plain = work / "scored.jsonl", work / "plain.jsonl"
    if scored.exists():
        return scored, plain
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:64]]
    gen = np.random.default_rng(0)
    out = []
    for i, r in enumerate(rows[:24]):
        negatives = [r["hard_negative"], rows[i + 30]["document"], rows[i + 30]["hard_negative"]][:(3, 1, 0)[i % 3]]
        scores = [round(float(x), 4) for x in gen.normal(0, 2, 1 + len(negatives))]
        out.append({"query": r["query"], "document": r["document"], "hard_negative": negatives, "scores": scores})
    scored.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    plain.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[56:64]), encoding="utf-8")
    return scored, plain


def distill_data() -> tuple[str, ...]:
    from test_distributed import _workdir

    scored, plain = _scored_sources(_workdir())
    return (f"data.sources[0].path={scored}", "data.sources[0].fields.scores=scores",
            f"data.sources[1].path={plain}", "data.hard_negatives=2")


DISTILL = ("loss.distill_weight=2.0", "loss.distill_temperature=0.5")


@pytest.mark.parametrize("variant", [
    ("launch.nproc_per_node=2", "cache.chunk_size=3", "deepspeed.zero_stage=0"),
    ("launch.nproc_per_node=2", "cache.chunk_size=3", "deepspeed.zero_stage=2"),
    ("launch.nproc_per_node=2", "cache.chunk_size=3", "cache.chunk_tokens=96", "deepspeed.zero_stage=3"),
], ids=["2-ranks-zero0", "2-ranks-zero2", "2-ranks-zero3-uneven-chunks"])
def test_distilled_training_matches_one_uncached_process(variant):
    """GradCache, ZeRO 0/2/3 and two ranks with cross-device negatives take the steps one uncached process
    takes with the whole batch: the weights after 3 steps, the gradient norm and the KL of every step.
    The norms catch a wrong world-size scaling of the KL's gradient, which AdamW would divide out."""
    from test_distributed import assert_same_weights, assert_trained, train_log, trained_weights

    data = distill_data()
    reference = trained_weights(*data, *DISTILL, "cache.enabled=false")
    assert_trained(reference)
    assert_same_weights(trained_weights(*data, *DISTILL, *variant), reference, tol=1e-5)
    want, got = train_log(*data, *DISTILL, "cache.enabled=false"), train_log(*data, *DISTILL, *variant)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], rel=1e-4)
    assert [r["distill_kl"] for r in got] == pytest.approx([r["distill_kl"] for r in want], rel=1e-4)


def test_distillation_changes_training_and_is_logged():
    from test_distributed import train_log, trained_weights

    data = distill_data()
    rows = train_log(*data, *DISTILL, "cache.enabled=false")
    # some rows of every batch are scored, never all: the unscored source and the rows without negatives
    assert all(r["distill_kl"] > 0 and 0 < r["distill_frac"] < 1 for r in rows)
    assert "distill_kl" not in train_log(*data, "cache.enabled=false")[0]  # only logged when distilling
    on, off = trained_weights(*data, *DISTILL, "cache.enabled=false"), trained_weights(*data, "cache.enabled=false")
    assert max((on[k] - off[k]).abs().max().item() for k in on) > 1e-5


# ---------------------------------------------------------------- the reader

def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def scored_rows(n: int, negatives_of: Callable[[int], int]) -> list[dict]:
    """Sample rows with their own negatives (how many: negatives_of(i)) and a distinct score per document."""
    base = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:2 * n]]
    out = []
    for i, r in enumerate(base[:n]):
        negatives = [r["hard_negative"], base[n + i]["document"], base[n + i]["hard_negative"]][:negatives_of(i)]
        out.append({"query": r["query"], "document": r["document"], "hard_negative": negatives,
                    "scores": [i * 10 + k + 0.5 for k in range(1 + len(negatives))]})
    return out


def expected_scores(rows: list[dict], tokenize) -> dict:
    """(query ids, document ids) -> the teacher's score, from the rows as written."""
    out = {}
    for r in rows:
        for text, score in zip([r["document"], *r["hard_negative"]], r["scores"]):
            out[(tokenize(r["query"], "query: ", 32), tokenize(text, "passage: ", 128))] = score
    return out


def test_scores_reach_the_batch_in_order_and_follow_the_rotated_negatives(tmp_path):
    """Each example's scores are its positive's, then its hard negatives' in the batch's order, whichever of
    the row's negatives an epoch takes (data.hard_negatives=1 of 3); negatives borrowed from other rows (a
    row without its own) have none, and neither has a source without scores. A JSONL list and a CSV cell."""
    import csv

    from transformers import AutoTokenizer

    from koe5.data.dataset import load_training_data

    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-ko-bert"))

    def tokenize(text, prefix, max_len):
        return tuple(tok(prefix + text, truncation=True, max_length=max_len)["input_ids"])

    rows = scored_rows(12, lambda i: (3, 3, 0)[i % 3])
    jsonl = write_jsonl(tmp_path / "scored.jsonl", rows)
    csv_rows = scored_rows(8, lambda i: 1)
    with open(tmp_path / "scored.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["query", "document", "hard_negative", "teacher"])
        for r in csv_rows:
            writer.writerow([r["query"], r["document"], r["hard_negative"][0], json.dumps(r["scores"])])
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)[40:48]), encoding="utf-8")
    spec = expand(QUICKSTART, [f"data.sources=[{{path: {jsonl}, fields: {{scores: scores}}}}, "
                               f"{{path: {tmp_path / 'scored.csv'}, fields: {{scores: teacher}}}}, {{path: {plain}}}]",
                               "data.hard_negatives=1", "train.batch_size=4", "cache.chunk_size=4",
                               "loss.distill_weight=1"])[0].spec
    data = load_training_data(spec, tok)
    want = expected_scores(rows, tokenize) | expected_scores(csv_rows, tokenize)

    seen = {"scored": 0, "borrowed": 0, "plain": 0}
    taken: dict[tuple, set] = {}  # (source, row) -> the negatives the epochs took
    for step in range(2 * data.steps_per_epoch):
        batch = data.global_batch(step)
        for i in range(len(batch)):
            k, row = int(batch.source[i]), int(batch.row[i])
            t = data.sources[k]
            query = tuple(t.query(row).tolist())
            docs = [int(batch.positive[i]), *batch.negatives[i].tolist()]
            got = batch.scores[i].tolist()
            if k == 2:
                assert all(math.isnan(x) for x in got)
                seen["plain"] += 1
                continue
            assert got[0] == want[(query, tuple(t.doc(docs[0]).tolist()))]
            own = int(t.rows_docs[row + 1] - t.rows_docs[row] - t.rows_npos[row])
            if own == 0:
                assert math.isnan(got[1])  # another row's positive: the teacher scored it for another query
                seen["borrowed"] += 1
            else:
                assert got[1] == want[(query, tuple(t.doc(docs[1]).tolist()))]
                taken.setdefault((k, row), set()).add(docs[1])
                seen["scored"] += 1
    assert min(seen.values()) > 0
    assert any(len(negs) == 2 for negs in taken.values())  # the second epoch took another negative


@pytest.mark.parametrize("first", ["own", "mined"])
def test_mined_negatives_have_no_teacher_score(tmp_path, first):
    """A scored source's mined negatives get NaN scores (left out of the KL term), and each of the row's own
    documents keeps its own score wherever mine.first puts it: after the own negative, or before it."""
    from transformers import AutoTokenizer

    from koe5.data.dataset import load_training_data

    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-ko-bert"))
    rows = scored_rows(30, lambda i: 1)
    path = write_jsonl(tmp_path / "scored.jsonl", rows)
    spec = expand(QUICKSTART, [f"data.sources=[{{path: {path}, fields: {{scores: scores}}, "
                               f"mine: {{negatives: 2, ranks: [2, 30], margin: 0.9999, first: {first}}}}}]",
                               "data.hard_negatives=2", "train.batch_size=8", "cache.chunk_size=8",
                               "loss.distill_weight=1"])[0].spec
    t = load_training_data(spec, tok).sources[0]
    mined = own_behind = 0
    for row in range(t.n_rows):
        start, end = int(t.rows_docs[row]), int(t.rows_docs[row + 1])
        scores = t.docs_score[start:end].tolist()
        negatives = [tuple(t.doc(j).tolist()) for j in range(start + 1, end)]
        own = tuple(tok("passage: " + rows[row]["hard_negative"][0], truncation=True,
                        max_length=spec.model.passage_max_len)["input_ids"])
        assert scores[0] == rows[row]["scores"][0]  # the positive's
        for doc, score in zip(negatives, scores[1:]):
            assert score == rows[row]["scores"][1] if doc == own else math.isnan(score)
        assert own in negatives
        if first == "own":
            assert negatives.index(own) == 0  # the own negative leads
        own_behind += len(negatives) > 1 and negatives.index(own) == len(negatives) - 1
        mined += len(negatives) - 1
    assert mined > 0
    if first == "mined":
        assert own_behind > 0  # behind the mined ones (unless mining picked it itself)


@pytest.mark.parametrize("line3,error", [
    ({"scores": [0.5, "high"]}, r"field 'scores' holds 'high', not a finite number"),
    ({"scores": [0.5, True]}, r"field 'scores' holds True, not a finite number"),
    ({"scores": [0.5, float("nan")]}, r"field 'scores' holds nan, not a finite number"),
    ({"scores": [0.5]}, r"field 'scores' has 1 scores for the record's 2 documents"),
    ({"scores": [0.5, 0.1, 0.2]}, r"field 'scores' has 3 scores for the record's 2 documents"),
    ({"scores": None}, r"missing field 'scores'"),
])
def test_a_bad_score_names_the_file_and_line(tmp_path, line3, error):
    from koe5.data.triples import DataError, read_triples

    rows = [{"query": f"질문 {i}", "document": f"문서 {i}", "hard_negative": [f"오답 {i}"], "scores": [1.0, 0.0]}
            for i in range(4)]
    rows[2].update(line3)
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=rf"^{path}:3: {error}"):
        read_triples(path, hard_negatives=1, fields={"scores": "scores"})
    skipped: dict = {}  # data.on_error: skip leaves the row out and counts it
    assert len(read_triples(path, hard_negatives=1, fields={"scores": "scores"}, skipped=skipped)) == 3
    assert skipped == {str(path): 1}


def test_a_bad_csv_score_cell_names_the_file_and_line(tmp_path):
    from koe5.data.triples import DataError, read_triples

    path = tmp_path / "bad.csv"
    path.write_text("query,document,hard_negative,scores\n질문,문서,오답,\"[0.9, 0.1]\"\n질문2,문서2,오답2,0.9 x\n",
                    encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:3: field 'scores' holds 'x', not a finite number"):
        read_triples(path, hard_negatives=1, fields={"scores": "scores"})
    first = read_triples(tmp_path / "bad.csv", hard_negatives=1, fields={"scores": "scores"}, skipped={})[0]
    assert first.scores == (0.9, 0.1)


# ---------------------------------------------------------------- the spec

def spec_errors(*overrides: str) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        expand(QUICKSTART, list(overrides))
    return info.value.errors


SCORED = ("data.sources[0].fields.scores=scores",)


@pytest.mark.parametrize("overrides,key,message", [
    (("loss.distill_weight=0.5",), "loss.distill_weight", "no source of data.sources maps a scores column"),
    ((*SCORED, "loss.distill_weight=0.5", "data.hard_negatives=0"), "loss.distill_weight",
     "data.hard_negatives is 0"),
    ((*SCORED, "loss.distill_weight=-1"), "loss.distill_weight", "expected a weight >= 0"),
    ((*SCORED, "loss.distill_weight=1", "loss.distill_temperature=0"), "loss.distill_temperature",
     "expected a temperature > 0"),
    ((*SCORED, "loss.distill_temperature=2"), "loss.distill_temperature", "only used with loss.distill_weight"),
    ((*SCORED, "data.sources[0].format=scored_pairs", "data.sources[0].min_score=3"), "data.sources[0].fields.scores",
     "only used by format triples"),
    ((*SCORED, "data.sources[0].fields.hard_negative=null"), "data.sources[0].fields.scores",
     "fields.hard_negative is null"),
])
def test_bad_distillation_settings_name_their_key(overrides, key, message):
    errors = spec_errors(*overrides)
    assert any(path == key and message in text for path, text in errors), errors


def test_a_scored_source_with_distillation_is_valid():
    spec = expand(QUICKSTART, [*SCORED, "loss.distill_weight=0.5", "loss.distill_temperature=0.1"])[0].spec
    assert spec.loss.distill_weight == 0.5 and spec.data.sources[0].fields.scores == "scores"
    expand(QUICKSTART, [*SCORED, "loss.distill_weight=0"])  # 0 = off, scores unused


def test_the_model_card_declares_distillation():
    from koe5.export import model_card

    spec = expand(QUICKSTART, [*SCORED, "loss.distill_weight=0.5", "loss.distill_temperature=0.1"])[0].spec
    card = model_card(spec=spec, spec_yaml="", data_mix={})
    assert "| score distillation | KL to stored teacher scores, weight 0.5, teacher temperature 0.1 |" in card
    assert "score distillation" not in model_card(spec=expand(QUICKSTART, [])[0].spec, spec_yaml="", data_mix={})
