"""GradCache and the contrastive loss against plain full-batch backprop, on random inputs."""

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from koe5.inputs import padded_length
from koe5.model import EmbeddingModel
from koe5.train.gradcache import embed_without_grad, replay, row_chunks, token_chunks
from koe5.train.loss import GuideConfig
from koe5.train.step import StepConfig, train_step


def tiny_model(dropout: float = 0.0, seed: int = 0) -> EmbeddingModel:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return EmbeddingModel(BertModel(cfg, add_pooling_layer=False), "mean", True)


def random_batch(rows: int, max_len: int, gen: torch.Generator) -> dict:
    lengths = torch.randint(3, max_len + 1, (rows,), generator=gen)
    width = padded_length(max_len)
    ids = torch.randint(5, 120, (rows, width), generator=gen)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


class PlainEngine:
    """The engine interface train_step uses, without DeepSpeed: grads stay in .grad for inspection."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **batch):
        return self.model(**batch)

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass


def reference_loss(q, d, doc_ids, temperature, symmetric, mask_duplicates, guide=None):
    """Plain InfoNCE written out directly (no blocks, no leaves), the thing GradCache must reproduce.
    `guide`: (guide's query embeddings, guide's document embeddings, GuideConfig), masking as GISTEmbed."""
    b = q.shape[0]
    pos = torch.arange(b)

    def guided(g_rows, g_pool, maskable):  # candidates the guide rates above the positive, less the margin
        g = g_rows @ g_pool.T
        g_pos = g[pos, pos][:, None]
        cfg = guide[2]
        threshold = g_pos - cfg.margin if cfg.margin_strategy == "absolute" else g_pos - g_pos.abs() * cfg.margin
        out = (g > threshold) & maskable[None, :]
        out[pos, pos] = False
        return out

    s = q @ d.T / temperature
    if mask_duplicates:
        same = doc_ids[None, :] == doc_ids[pos][:, None]
        same[pos, pos] = False
        s = s.masked_fill(same, float("-inf"))
    if guide is not None:
        is_positive = torch.arange(d.shape[0]) < b
        maskable = (is_positive & ("in_batch" in guide[2].mask)) | (~is_positive & ("hard_negatives" in guide[2].mask))
        s = s.masked_fill(guided(guide[0], guide[1], maskable), float("-inf"))
    loss = F.cross_entropy(s, pos)
    if symmetric:
        t = d[:b] @ q.T / temperature
        if mask_duplicates:
            same = doc_ids[:b][None, :] == doc_ids[:b][:, None]
            same[pos, pos] = False
            t = t.masked_fill(same, float("-inf"))
        if guide is not None:
            t = t.masked_fill(guided(guide[1][:b], guide[0], torch.full((b,), "queries" in guide[2].mask)),
                              float("-inf"))
        loss = (loss + F.cross_entropy(t, pos)) / 2
    return loss


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("loss_name", ["infonce", "symmetric_infonce"])
@pytest.mark.parametrize("chunking", [dict(chunk_size=1), dict(chunk_size=3), dict(chunk_size=1000),
                                      dict(chunk_tokens=40), dict(chunk_tokens=100)])
def test_gradcache_matches_full_batch_backprop(seed, loss_name, chunking):
    gen = torch.Generator().manual_seed(seed)
    b, n_neg, tau = 6, 2, 0.05
    queries = random_batch(b, 12, gen)
    docs = random_batch(b * (1 + n_neg), 20, gen)
    # some duplicate documents so masking matters: doc 7 repeats the identity of positive 1
    doc_ids = torch.randint(0, 10**9, (b * (1 + n_neg),), generator=gen)
    doc_ids[7] = doc_ids[1]
    doc_ids[b + 2] = doc_ids[3]

    ref = tiny_model(seed=seed)
    loss = reference_loss(ref(**queries), ref(**docs), doc_ids, tau, loss_name == "symmetric_infonce", True)
    loss.backward()
    want = grads_of(ref)

    model = tiny_model(seed=seed)
    cfg = StepConfig(loss_name=loss_name, temperature=tau, mask_duplicates=True, cache=True, **chunking)
    result = train_step(PlainEngine(model), queries, docs, doc_ids, cfg, torch.device("cpu"))
    got = grads_of(model)

    assert abs(result.loss - loss.item()) < 1e-5
    assert want.keys() == got.keys() and len(want) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


GUIDES = [GuideConfig(0.0, "absolute"), GuideConfig(0.01, "relative", ("in_batch",)),
          GuideConfig(0.01, "absolute", ("hard_negatives", "queries"))]


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("loss_name", ["infonce", "symmetric_infonce"])
@pytest.mark.parametrize("chunking", [dict(chunk_size=1), dict(chunk_size=4), dict(chunk_tokens=60),
                                      dict(cache=False)])
@pytest.mark.parametrize("guide", GUIDES, ids=["abs0-all", "rel-in_batch", "abs-negatives+queries"])
def test_guided_loss_matches_full_batch_backprop(seed, loss_name, chunking, guide):
    """loss.guide_model: the guide's masks applied chunk by chunk (or uncached) give the full-batch guided
    loss and gradients, for every candidate kind and margin strategy, with duplicate masking alongside."""
    gen = torch.Generator().manual_seed(seed)
    b, n_neg, tau = 6, 2, 0.05
    queries, docs = random_batch(b, 12, gen), random_batch(b * (1 + n_neg), 20, gen)
    doc_ids = torch.arange(b * (1 + n_neg))
    doc_ids[9] = doc_ids[2]
    guide_model = tiny_model(seed=seed + 100).eval()  # another model over the same vocabulary, frozen
    symmetric = loss_name == "symmetric_infonce"

    ref = tiny_model(seed=seed)
    with torch.no_grad():
        g = (guide_model(**queries), guide_model(**docs), guide)
    loss = reference_loss(ref(**queries), ref(**docs), doc_ids, tau, symmetric, True, guide=g)
    loss.backward()
    want = grads_of(ref)
    unguided = reference_loss(ref(**queries), ref(**docs), doc_ids, tau, symmetric, True).item()

    model = tiny_model(seed=seed)
    cfg = StepConfig(loss_name=loss_name, temperature=tau, guide=guide, **{"chunk_size": 3, **chunking})
    result = train_step(PlainEngine(model), queries, docs, doc_ids, cfg, torch.device("cpu"), guide_model=guide_model)
    got = grads_of(model)

    assert 0 < result.guide_masked_frac < 1  # the guide masked some candidates, not all
    assert abs(unguided - loss.item()) > 1e-3  # so the guided loss is a different loss
    assert abs(result.loss - loss.item()) < 1e-5
    assert want.keys() == got.keys() and len(want) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)
    assert not any(p.grad is not None for p in guide_model.parameters())  # the guide never trains


def test_guide_masked_count_is_the_candidates_above_the_positive():
    """The diagnostics count, per query, the candidates the guide rated above the positive (duplicates of
    the positive are masked as duplicates, not counted)."""
    from koe5.train.loss import contrastive_loss

    gen = torch.Generator().manual_seed(0)
    q, d = F.normalize(torch.randn(4, 8, generator=gen), dim=-1), F.normalize(torch.randn(8, 8, generator=gen), dim=-1)
    gq, gd = F.normalize(torch.randn(4, 5, generator=gen), dim=-1), F.normalize(torch.randn(8, 5, generator=gen), dim=-1)
    ids = torch.arange(8)
    ids[6] = ids[2]  # query 2's hard negative copies its positive
    g = gq @ gd.T
    above = g > g[torch.arange(4), torch.arange(4)][:, None]
    above[2, 6] = False
    result = contrastive_loss(q, d, ids, temperature=0.1, guide_q=gq, guide_d=gd, guide=GuideConfig())
    assert above.sum() > 0
    assert result.guide_masked == pytest.approx(above.sum().item() / 4)
    candidates = torch.tensor([7, 7, 6, 7])  # all but the positive (and query 2's duplicate)
    assert result.guide_masked_frac == pytest.approx((above.sum(1) / candidates).mean().item())


def reference_matryoshka_loss(q, d, doc_ids, temperature, symmetric, dims, weights, guide=None):
    """sum_k w_k * InfoNCE on the embeddings truncated to d_k and renormalized, written out directly."""
    return sum(w * reference_loss(F.normalize(q[:, :k], dim=-1), F.normalize(d[:, :k], dim=-1), doc_ids,
                                  temperature, symmetric, True, guide=guide) for k, w in zip(dims, weights))


@pytest.mark.parametrize("loss_name", ["infonce", "symmetric_infonce"])
@pytest.mark.parametrize("chunking", [dict(chunk_size=1), dict(chunk_size=4), dict(chunk_tokens=60),
                                      dict(cache=False)])
@pytest.mark.parametrize("levels,guided", [(((32, 16, 8), (1.0, 0.5, 0.25)), False), (((4, 24), (2.0, 1.0)), True)],
                         ids=["3-levels", "2-levels-guided"])
def test_matryoshka_loss_matches_full_batch_backprop(loss_name, chunking, levels, guided):
    """loss.matryoshka_dims: the weighted sum over truncated, renormalized embeddings, through GradCache's
    chunks (or uncached), gives the full-batch loss and gradients; with a guide too."""
    from koe5.train.loss import MatryoshkaConfig

    gen = torch.Generator().manual_seed(4)
    b, n_neg, tau = 6, 2, 0.05
    queries, docs = random_batch(b, 12, gen), random_batch(b * (1 + n_neg), 20, gen)
    doc_ids = torch.arange(b * (1 + n_neg))
    doc_ids[9] = doc_ids[2]
    dims, weights = levels
    guide_model = tiny_model(seed=100).eval() if guided else None
    guide = GuideConfig(0.01, "relative") if guided else None
    symmetric = loss_name == "symmetric_infonce"

    ref = tiny_model(seed=4)
    g = None
    if guided:
        with torch.no_grad():
            g = (guide_model(**queries), guide_model(**docs), guide)
    loss = reference_matryoshka_loss(ref(**queries), ref(**docs), doc_ids, tau, symmetric, dims, weights, g)
    loss.backward()
    want = grads_of(ref)
    full_only = reference_loss(ref(**queries), ref(**docs), doc_ids, tau, symmetric, True, guide=g).item()

    model = tiny_model(seed=4)
    cfg = StepConfig(loss_name=loss_name, temperature=tau, guide=guide, matryoshka=MatryoshkaConfig(dims, weights),
                     **{"chunk_size": 3, **chunking})
    result = train_step(PlainEngine(model), queries, docs, doc_ids, cfg, torch.device("cpu"), guide_model=guide_model)
    got = grads_of(model)

    assert abs(full_only - loss.item()) > 1e-2  # the truncated levels are a different loss
    assert abs(result.loss - loss.item()) < 1e-5
    assert want.keys() == got.keys() and len(want) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


def test_uncached_step_matches_cached_step():
    gen = torch.Generator().manual_seed(5)
    queries, docs = random_batch(8, 10, gen), random_batch(16, 16, gen)
    doc_ids = torch.arange(16)
    grads = []
    for cache in (True, False):
        model = tiny_model(seed=3)
        train_step(PlainEngine(model), queries, docs, doc_ids, StepConfig(cache=cache, chunk_size=3),
                   torch.device("cpu"))
        grads.append(grads_of(model))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_replay_reproduces_dropout_bit_for_bit():
    gen = torch.Generator().manual_seed(11)
    model = tiny_model(dropout=0.3).train()
    batch = random_batch(10, 16, gen)
    chunks = row_chunks(10, 3)
    torch.manual_seed(123)
    first, states = embed_without_grad(model, batch, chunks, torch.device("cpu"))
    # the dropout masks really are random: a fresh forward differs
    assert not torch.equal(model(**batch), first)

    replayed = []

    def recording_model(**chunk):
        out = model(**chunk)
        replayed.append(out.detach())
        return out

    replay(recording_model, batch, chunks, states, torch.ones_like(first), lambda s: s.backward())
    assert torch.equal(torch.cat(replayed), first)


def test_token_chunks_respect_the_budget_and_cover_every_row_once():
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        lengths = torch.randint(1, 300, (int(torch.randint(1, 60, (1,), generator=gen)),), generator=gen).tolist()
        budget = int(torch.randint(64, 4096, (1,), generator=gen))
        chunks = token_chunks(lengths, budget)
        rows = sorted(i for c in chunks for i in c.tolist())
        assert rows == list(range(len(lengths)))
        for c in chunks:
            width = padded_length(max(lengths[i] for i in c.tolist()))
            assert len(c) == 1 or len(c) * width <= budget


def test_duplicate_masking_changes_loss_only_when_duplicates_exist():
    from koe5.train.loss import contrastive_loss

    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    d = F.normalize(torch.randn(8, 8, generator=gen), dim=-1)
    distinct = torch.arange(8)
    a = contrastive_loss(q, d, distinct, temperature=1.0, mask_duplicates=True).loss
    b = contrastive_loss(q, d, distinct, temperature=1.0, mask_duplicates=False).loss
    assert a == pytest.approx(b, abs=1e-7)
    dup = distinct.clone()
    dup[5] = dup[0]  # query 0's hard negative is a copy of its positive
    c = contrastive_loss(q, d, dup, temperature=1.0, mask_duplicates=True).loss
    assert c < b


class Bf16AccumulatingEngine(PlainEngine):
    """The broken mechanism, for contrast: each backward's gradient summed into a bf16 buffer."""

    def backward(self, loss):
        loss.backward()
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad = p.grad.bfloat16().float()


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_cached_bf16_is_as_close_to_fp32_as_uncached_bf16(chunk_size):
    """bf16 GradCache (one backward per chunk, up to 128 here) is no further from the fp32 full-batch
    gradient than one uncached bf16 step, within the noise of different chunk widths (measured 1.3-1.5x).
    Catches accumulation of the chunk gradients in bf16, which is 60-100x further away at these sizes
    (the engine above); tests/test_distributed.py checks DeepSpeed accumulates as the plain module does."""
    gen = torch.Generator().manual_seed(0)
    queries, docs, doc_ids = random_batch(32, 16, gen), random_batch(96, 40, gen), torch.arange(96)

    def grads(engine_type=PlainEngine, **cfg):
        model = tiny_model(seed=1)
        train_step(engine_type(model), queries, docs, doc_ids, StepConfig(temperature=0.05, **cfg), torch.device("cpu"))
        return grads_of(model)

    reference = grads(cache=False)

    def error(g):
        return float(torch.sqrt(sum(((g[n] - reference[n]) ** 2).sum() for n in reference)
                                / sum((reference[n] ** 2).sum() for n in reference)))

    uncached = error(grads(cache=False, bf16=True))
    assert uncached > 1e-5  # bf16 autocast really ran
    assert error(grads(cache=True, chunk_size=chunk_size, bf16=True)) < 2 * uncached
    assert error(grads(Bf16AccumulatingEngine, cache=True, chunk_size=chunk_size, bf16=True)) > 10 * uncached
