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
ROW_BLOCK = 4096  # query rows scored at a time, so the full score matrix never exists at large batch


@dataclass
class LossResult:
    loss: float              # the global loss value (same on every rank)
    grad_q: torch.Tensor     # d(loss)/d(local query embeddings), scaled for DeepSpeed's averaging
    grad_d: torch.Tensor     # d(loss)/d(local document embeddings), likewise
    margin: float            # mean over queries of (positive score - hardest negative score), cosine units
    false_neg_frac: float    # mean over queries of the fraction of negatives scoring above the positive


def _gather(x: torch.Tensor, world_size: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _direction(rows: torch.Tensor, pool: torch.Tensor, targets: torch.Tensor, row_ids: torch.Tensor,
               pool_ids: torch.Tensor, temperature: float, mask_duplicates: bool, normalizer: float,
               stats: list | None) -> float:
    """Accumulate into rows.grad / pool.grad the gradient of sum_i CE(rows_i . pool / tau, target_i) / normalizer.
    `rows` is a view of a leaf (see caller), so backward reaches the leaves."""
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
    return total


def contrastive_loss(q: torch.Tensor, d: torch.Tensor, doc_ids: torch.Tensor, *, name: str = "infonce",
                     temperature: float = 0.02, mask_duplicates: bool = True,
                     cross_device: bool = True) -> LossResult:
    """Loss value and embedding gradients for one rank's detached embeddings.

    q: [b, dim] query embeddings; d: [b * (1 + n), dim] documents (positives first); doc_ids: [b * (1 + n)]
    integer identities of the documents (for duplicate masking). Works in float32.
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

    stats = [0.0, 0.0, 0]
    # Each direction's terms are divided by normalizer / half, so the symmetric loss is their average.
    half = 0.5 if name == "symmetric_infonce" else 1.0
    total = _direction(q_all[q_off:q_off + b], d_all, pos_local, pos_ids_local, ids_all,
                              temperature, mask_duplicates, normalizer / half, stats)
    if name == "symmetric_infonce":
        total += _direction(d_all[pos_local], q_all, q_off + local, pos_ids_local, q_pos_ids,
                                   temperature, mask_duplicates, normalizer / half, None)

    grad_q, grad_d = q_all.grad, d_all.grad
    summary = torch.tensor([total, stats[0], stats[1], stats[2]], dtype=torch.float64, device=q.device)
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
    )
