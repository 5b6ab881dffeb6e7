"""Contrastive losses on (cached) embeddings, returning the gradient w.r.t. every local embedding.

Layout of one rank's batch of b queries with n hard negatives each:
    queries   q[0..b)
    documents d[0..b) are the positives (d[i] answers q[i]), then d[b + i*n + j] is q[i]'s j-th negative.

Losses (tau = temperature, s(x, y) = x . y / tau, candidates C = every document in the pool):
- infonce:            L = mean_i  -log softmax_{c in C}(s(q_i, c))[pos_i]
- symmetric_infonce:  L = (L_qd + L_dq) / 2, the average of two directions, where
                      L_dq = mean_i -log softmax_{q in Q}(s(d_i, q))[i] scores each positive against all queries.
With cross-device negatives the pool C (and Q) is every rank's documents (queries), and the mean runs over
the global batch. Duplicate masking removes from a row every candidate with the same document identity
as the row's own positive (except the positive itself): a copy of the answer is not a negative.

Guided false-negative filtering (GISTEmbed, `loss.guide_model`): a frozen guide model embeds the same rows
(cosine similarity g, with no gradient). A row's candidate c is masked when the guide rates it above the
row's positive: g(row, c) > g(row, pos) - margin (`absolute`) or > g(row, pos) - |g(row, pos)| * margin
(`relative`); the positive itself never is. `GuideConfig.mask` picks which candidates may be masked: the
other rows' positives (`in_batch`), the hard negatives (`hard_negatives`) and, in the document -> query
direction of symmetric_infonce, the other queries (`queries`). With cross-device negatives the guide's
embeddings are gathered like the model's. For infonce with every kind masked this is sentence-transformers'
GISTEmbedLoss with contrast_anchors=False and contrast_positives=False (tests/test_loss_options.py: the same loss
and gradients with one hard negative per query, the same temperature). Where they differ: GISTEmbedLoss by
default also contrasts anchors with anchors and positives with positives (koe5 has no such terms), takes
one negative column (koe5 any number per query), has no document -> query direction, always scores the
model by cosine (koe5 by dot product, cosine unless model.normalize is off), and has no duplicate masking
(koe5 masks a copy of the positive as a duplicate, not counted as the guide's).

Matryoshka (`loss.matryoshka_dims`, with weights w_k): L = sum_k w_k * L(q[:, :d_k], d[:, :d_k]), each
level's embeddings truncated to their first d_k dimensions and renormalized, as sentence-transformers'
MatryoshkaLoss (its `shrink`) around MultipleNegativesRankingLoss; every level masks the same candidates
(duplicates, the guide's). Each level is computed on leaves of its own, and its gradient is carried back
through the truncation and normalization onto the full embeddings, so GradCache replays the model once.
The margin and false-negative diagnostics are those of the widest level.

Score distillation (`loss.distill_weight` w, `loss.distill_temperature` T; teacher scores t stored with the data,
a source's `fields.scores`): L = contrastive + w * mean_{i in S} KL(p_i || q_i), where for query i the
candidates are its own documents only (its positive and its hard negatives, in the batch's layout),
p_i = softmax(t_i / T) the teacher's distribution and log q_i = log_softmax(s(q_i, d) / tau) the student's,
tau being loss.temperature. A candidate without a teacher score (a mined negative, a negative borrowed from
another row) is left out of both distributions; S is the global batch's queries with at least two scored
candidates (rows of sources without scores are not in S), and the mean is over S, all ranks together, so it
does not depend on cross-device negatives. Duplicate masking and the guide do not touch this term: a
candidate the teacher rates high is exactly what it teaches. With Matryoshka the term is taken at every
width, with that width's weight (MatryoshkaLoss around contrastive + w * KL). In symmetric_infonce it is
added once (the teacher scored documents for queries). This is sentence-transformers' DistillKLDivLoss with
student_temperature=tau and teacher_temperature=T, except that koe5 does not multiply by tau^2 (it uses
tau < 1, where Hinton's factor shrinks the term; w sets its scale) and has a row with any number of
negatives, or some unscored, in one batch. FlagEmbedding (BGE-M3, KURE-v2) minimizes the cross-entropy
-sum p log q instead, which has the same gradient; the logged `distill_kl` is the KL (>= 0).

Gradient convention: each rank computes the loss terms of its own queries against the gathered pool and
the gradient w.r.t. the whole pool; an all-reduce sums those gradients and each rank keeps its slice.
DeepSpeed then *averages* parameter gradients over ranks, so the slice is multiplied by world_size:
N ranks with global batch B take exactly the step one process takes with batch B.
Without cross-device negatives each rank's loss is the mean over its own rows, and DeepSpeed's average
gives the mean over ranks. The distillation term's mean is over the global count |S| (one all-reduce):
each rank divides its rows' sum by |S| (by |S| / world_size without cross-device negatives, where its
gradient is not multiplied by world_size), so DeepSpeed's average gives exactly the sum over S / |S|.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

LOSSES = ("infonce", "symmetric_infonce")
GUIDE_MASKS = ("in_batch", "hard_negatives", "queries")  # candidate kinds the guide may mask
ROW_BLOCK = 4096  # query rows scored at a time, so the full score matrix never exists at large batch


@dataclass
class LossResult:
    loss: float              # the global loss value (same on every rank)
    grad_q: torch.Tensor     # d(loss)/d(local query embeddings), scaled for DeepSpeed's averaging
    grad_d: torch.Tensor     # d(loss)/d(local document embeddings), likewise
    margin: float            # mean over queries of (positive score - hardest negative score), cosine units
    false_neg_frac: float    # mean over queries of the fraction of negatives scoring above the positive
    guide_masked: float | None = None       # mean over queries of the candidates the guide masked (count)
    guide_masked_frac: float | None = None  # ... as a fraction of the query's candidates (positive excluded)
    distill_kl: float | None = None    # mean KL(teacher || student) over the scored queries (widest width)
    distill_frac: float | None = None  # the scored queries' share of the global batch


@dataclass
class DistillConfig:
    """Score distillation: the KL term's weight and the teacher's temperature (see the module docstring)."""
    weight: float
    temperature: float = 1.0


@dataclass
class MatryoshkaConfig:
    """The widths the loss is taken at, and each one's weight."""
    dims: tuple[int, ...]
    weights: tuple[float, ...]


@dataclass
class GuideConfig:
    """How the guide's scores mask candidates (see the module docstring)."""
    margin: float = 0.0
    margin_strategy: str = "absolute"  # or "relative"
    mask: tuple[str, ...] = GUIDE_MASKS


def guide_false_negatives(guide_rows: torch.Tensor, guide_pool: torch.Tensor, targets: torch.Tensor,
                          maskable: torch.Tensor, cfg: GuideConfig) -> torch.Tensor:
    """[rows, pool] True where the guide rates a maskable candidate above the row's positive (its target),
    less the margin. Strictly above, as GISTEmbedLoss: with margin 0 a candidate the guide ties with the
    positive stays a negative."""
    scores = guide_rows @ guide_pool.T  # the guide's embeddings are normalized: cosine
    arange = torch.arange(len(targets), device=scores.device)
    pos = scores[arange, targets][:, None]
    slack = cfg.margin if cfg.margin_strategy == "absolute" else pos.abs() * cfg.margin
    masked = (scores > pos - slack) & maskable[None, :]
    masked[arange, targets] = False
    return masked


def _gather(x: torch.Tensor, world_size: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _direction(rows: torch.Tensor, pool: torch.Tensor, targets: torch.Tensor, row_ids: torch.Tensor,
               pool_ids: torch.Tensor, temperature: float, mask_duplicates: bool, normalizer: float,
               stats: list | None, guide: tuple | None = None) -> float:
    """Accumulate into rows.grad / pool.grad the gradient of sum_i CE(rows_i . pool / tau, target_i) / normalizer.
    `rows` is a view of a leaf (see caller), so backward reaches the leaves. `guide` is (guide rows, guide
    pool, maskable pool columns, GuideConfig), or None."""
    total = 0.0
    for start in range(0, rows.shape[0], ROW_BLOCK):
        sl = slice(start, start + ROW_BLOCK)
        r, t = rows[sl], targets[sl]
        scores = r @ pool.T  # cosine when embeddings are normalized
        arange = torch.arange(len(t), device=scores.device)
        masked = torch.zeros_like(scores, dtype=torch.bool)
        if mask_duplicates:
            masked = pool_ids[None, :] == row_ids[sl, None]
            masked[arange, t] = False
        if guide is not None:
            g_rows, g_pool, maskable, cfg = guide
            by_guide = guide_false_negatives(g_rows[sl], g_pool, t, maskable, cfg) & ~masked
            masked = masked | by_guide
        logits = (scores / temperature).masked_fill(masked, float("-inf"))
        loss = F.cross_entropy(logits, t, reduction="sum") / normalizer
        loss.backward()
        total += loss.item()
        if stats is not None:
            with torch.no_grad():
                pos = scores[arange, t]
                neg = scores.masked_fill(masked, float("-inf"))
                neg[arange, t] = float("-inf")
                n_neg = (~masked).sum(1) - 1
                hardest = neg.max(1).values
                has_neg = n_neg > 0
                stats[0] += (pos - hardest)[has_neg].sum().item()
                above = (neg > pos[:, None]).sum(1).float() / n_neg.clamp(min=1)
                stats[1] += above[has_neg].sum().item()
                stats[2] += int(has_neg.sum().item())
                if guide is not None:
                    candidates = (~(masked & ~by_guide)).sum(1) - 1  # all but the positive and duplicates
                    count = by_guide.sum(1)
                    stats[3] += count.sum().item()
                    stats[4] += (count.float() / candidates.clamp(min=1)).sum().item()
    return total


def _distill(rows: torch.Tensor, docs: torch.Tensor, teacher: torch.Tensor, temperature: float,
             cfg: DistillConfig, normalizer: float) -> tuple[float, float]:
    """Accumulate into rows.grad / docs.grad the gradient of w * sum_i KL(p_i || q_i) / normalizer over this
    rank's scored queries, each against its own documents. rows: [b, dim] (views of leaves); docs: [b * (1 + n),
    dim] in the batch layout; teacher: [b, 1 + n] scores, NaN where none. Returns (the term, sum of KL)."""
    b = rows.shape[0]
    candidates = torch.cat([docs[:b, None], docs[b:].reshape(b, -1, docs.shape[1])], dim=1)  # [b, 1 + n, dim]
    scored = ~torch.isnan(teacher)
    use = scored.sum(1) >= 2  # a distribution over one candidate teaches nothing
    if not use.any():
        return 0.0, 0.0
    keep = scored[use]
    student = ((rows[use, None, :] * candidates[use]).sum(-1) / temperature).masked_fill(~keep, float("-inf"))
    log_q = torch.log_softmax(student, dim=1).masked_fill(~keep, 0.0)  # 0, not -inf: 0 * -inf would be NaN
    p = torch.softmax((teacher[use] / cfg.temperature).masked_fill(~keep, float("-inf")), dim=1)
    kl = F.kl_div(log_q, p, reduction="sum")  # sum p (log p - log q); an unscored candidate has p = 0
    loss = cfg.weight * kl / normalizer
    loss.backward()
    return loss.item(), kl.item()


def contrastive_loss(q: torch.Tensor, d: torch.Tensor, doc_ids: torch.Tensor, *, name: str = "infonce",
                     temperature: float = 0.02, mask_duplicates: bool = True,
                     cross_device: bool = True, guide_q: torch.Tensor | None = None,
                     guide_d: torch.Tensor | None = None, guide: GuideConfig | None = None,
                     matryoshka: MatryoshkaConfig | None = None, teacher: torch.Tensor | None = None,
                     distill: DistillConfig | None = None) -> LossResult:
    """Loss value and embedding gradients for one rank's detached embeddings.

    q: [b, dim] query embeddings; d: [b * (1 + n), dim] documents (positives first); doc_ids: [b * (1 + n)]
    integer identities of the documents (for duplicate masking). Works in float32.
    guide_q / guide_d: the guide model's normalized embeddings of the same rows, with `guide` saying how they
    mask candidates (None: no guided filtering). matryoshka: the widths and weights of a Matryoshka loss
    (None: the full embeddings only). teacher: [b, 1 + n] the teacher's scores of each query's documents
    (positive first, NaN where none), with `distill` its weight and temperature (None: no distillation).
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")
    b = q.shape[0]
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    gather = cross_device and world > 1

    q, d = q.detach().float(), d.detach().float()
    q_all = _gather(q, world) if gather else q
    d_all = _gather(d, world) if gather else d
    ids_all = _gather(doc_ids, world) if gather else doc_ids
    q_all.requires_grad_(True)
    d_all.requires_grad_(True)
    if guide is not None:
        guide_q, guide_d = guide_q.detach().float(), guide_d.detach().float()
        gq_all = _gather(guide_q, world) if gather else guide_q
        gd_all = _gather(guide_d, world) if gather else guide_d

    q_off = rank * b if gather else 0
    d_off = rank * d.shape[0] if gather else 0
    normalizer = float(b * world) if gather else float(b)
    local = torch.arange(b, device=q.device)
    pos_local = d_off + local                       # where each local query's positive sits in the pool
    pos_ids_local = ids_all[pos_local]

    # positive ids of every query in the pool (for the document -> query direction)
    n_docs = d.shape[0]
    q_pos = torch.cat([r * n_docs + torch.arange(b, device=q.device) for r in range(world)]) if gather else local
    q_pos_ids = ids_all[q_pos]

    guide_qd = guide_dq = None
    if guide is not None:
        # A pool column is another row's positive (in_batch) or a hard negative, by its place in its rank's block.
        is_positive = torch.arange(d_all.shape[0], device=q.device) % n_docs < b
        maskable = torch.zeros_like(is_positive)
        if "in_batch" in guide.mask:
            maskable |= is_positive
        if "hard_negatives" in guide.mask:
            maskable |= ~is_positive
        guide_qd = (gq_all[q_off:q_off + b], gd_all, maskable, guide)
        if "queries" in guide.mask:
            guide_dq = (gd_all[pos_local], gq_all, torch.ones(q_all.shape[0], dtype=torch.bool, device=q.device),
                        guide)

    n_scored = 0.0
    if distill is not None:
        teacher = teacher.detach().float()
        # |S|, the queries of the global batch in the KL term: the same count with or without gathering
        count = ((~torch.isnan(teacher)).sum(1) >= 2).sum().to(torch.float64).reshape(1)
        if distributed and world > 1:
            dist.all_reduce(count)
        n_scored = count.item()
    # the KL term's divisor: |S|; without gathering DeepSpeed's average over ranks divides once more
    distill_normalizer = n_scored / (1 if gather else world)

    stats = [0.0, 0.0, 0, 0.0, 0.0, 0.0]
    # Each direction's terms are divided by normalizer / half, so the symmetric loss is their average.
    half = 0.5 if name == "symmetric_infonce" else 1.0
    levels = [(None, 1.0)] if matryoshka is None else list(zip(matryoshka.dims, matryoshka.weights))
    widest = max(dim or 0 for dim, _ in levels)
    total = 0.0
    for dim, weight in levels:
        if dim is not None and dim > q.shape[1]:
            raise ValueError(f"loss.matryoshka_dims: {dim} is wider than the embeddings ({q.shape[1]})")
        # the level's own leaves: the full embeddings, or their truncated, renormalized copies
        qa, da = (q_all, d_all) if dim is None else (
            F.normalize(x.detach()[:, :dim], dim=-1).requires_grad_(True) for x in (q_all, d_all))
        level_stats = stats if (dim or 0) == widest else None
        total += _direction(qa[q_off:q_off + b], da, pos_local, pos_ids_local, ids_all,
                            temperature, mask_duplicates, normalizer / (half * weight), level_stats, guide_qd)
        if name == "symmetric_infonce":
            total += _direction(da[pos_local], qa, q_off + local, pos_ids_local, q_pos_ids,
                                temperature, mask_duplicates, normalizer / (half * weight), None, guide_dq)
        if distill is not None and n_scored:
            term, kl = _distill(qa[q_off:q_off + b], da[d_off:d_off + n_docs], teacher, temperature,
                                DistillConfig(distill.weight * weight, distill.temperature), distill_normalizer)
            total += term
            if (dim or 0) == widest:
                stats[5] += kl
        if dim is not None:  # chain rule through the truncation and normalization onto the full embeddings
            torch.autograd.backward([F.normalize(q_all[:, :dim], dim=-1), F.normalize(d_all[:, :dim], dim=-1)],
                                    [qa.grad, da.grad])

    grad_q, grad_d = q_all.grad, d_all.grad
    summary = torch.tensor([total, stats[0], stats[1], stats[2], stats[3], stats[4], stats[5]],
                           dtype=torch.float64, device=q.device)
    if distributed and world > 1:
        if gather:
            dist.all_reduce(grad_q)
            dist.all_reduce(grad_d)
        dist.all_reduce(summary)
    loss_value = summary[0].item() / (1 if gather else world)
    count = max(summary[3].item(), 1)
    # DeepSpeed averages parameter gradients over ranks; undo that for the summed (gathered) convention.
    scale = float(world) if gather else 1.0
    return LossResult(
        loss=loss_value,
        grad_q=grad_q[q_off:q_off + b] * scale,
        grad_d=grad_d[d_off:d_off + d.shape[0]] * scale,
        margin=summary[1].item() / count,
        false_neg_frac=summary[2].item() / count,
        # per query of the global batch (the local batch without cross-device negatives: summed over ranks)
        guide_masked=None if guide is None else summary[4].item() / (b * world),
        guide_masked_frac=None if guide is None else summary[5].item() / (b * world),
        distill_kl=None if distill is None else summary[6].item() / max(n_scored, 1),
        distill_frac=None if distill is None else n_scored / (b * world),
    )
