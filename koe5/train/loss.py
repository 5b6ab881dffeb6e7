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

Gradient convention: each rank computes the loss terms of its own queries against the gathered pool and
the gradient w.r.t. the whole pool; an all-reduce sums those gradients and each rank keeps its slice.
DeepSpeed then *averages* parameter gradients over ranks, so the slice is multiplied by world_size:
N ranks with global batch B take exactly the step one process takes with batch B.
Without cross-device negatives each rank's loss is the mean over its own rows, and DeepSpeed's average
gives the mean over ranks.
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


def contrastive_loss(q: torch.Tensor, d: torch.Tensor, doc_ids: torch.Tensor, *, name: str = "infonce",
                     temperature: float = 0.02, mask_duplicates: bool = True,
                     cross_device: bool = True, guide_q: torch.Tensor | None = None,
                     guide_d: torch.Tensor | None = None, guide: GuideConfig | None = None,
                     matryoshka: MatryoshkaConfig | None = None) -> LossResult:
    """Loss value and embedding gradients for one rank's detached embeddings.

    q: [b, dim] query embeddings; d: [b * (1 + n), dim] documents (positives first); doc_ids: [b * (1 + n)]
    integer identities of the documents (for duplicate masking). Works in float32.
    guide_q / guide_d: the guide model's normalized embeddings of the same rows, with `guide` saying how they
    mask candidates (None: no guided filtering). matryoshka: the widths and weights of a Matryoshka loss
    (None: the full embeddings only).
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

    stats = [0.0, 0.0, 0, 0.0, 0.0]
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
        if dim is not None:  # chain rule through the truncation and normalization onto the full embeddings
            torch.autograd.backward([F.normalize(q_all[:, :dim], dim=-1), F.normalize(d_all[:, :dim], dim=-1)],
                                    [qa.grad, da.grad])

    grad_q, grad_d = q_all.grad, d_all.grad
    summary = torch.tensor([total, stats[0], stats[1], stats[2], stats[3], stats[4]], dtype=torch.float64,
                           device=q.device)
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
    )
