"""Global batches: a seeded shuffle per epoch, cut into full batches, sliced per rank.

Every rank computes the same global order from (seed, epoch), so no rank has to send indices to
another, and a position (epoch, batch index) is all a resume needs. The last partial batch of an epoch
is dropped: it would spike the loss and leave ranks with uneven work.
"""

from __future__ import annotations

import numpy as np


def batches_per_epoch(n_examples: int, batch_size: int) -> int:
    return n_examples // batch_size


def global_batch(n_examples: int, batch_size: int, seed: int, epoch: int, index: int) -> np.ndarray:
    """Example indices of batch `index` of `epoch`."""
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    return order[index * batch_size:(index + 1) * batch_size]


def rank_slice(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    per_rank = len(batch) // world_size
    return batch[rank * per_rank:(rank + 1) * per_rank]


def pick_negatives(negatives: tuple[str, ...], count: int, epoch: int) -> list[str]:
    """`count` negatives, rotating through the available ones from epoch to epoch."""
    return [negatives[(epoch * count + j) % len(negatives)] for j in range(count)]
