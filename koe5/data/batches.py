"""How global batches are cut and shared out.

The last partial batch of an epoch is dropped: it would spike the loss and leave ranks with uneven work.
Every rank computes the same global batch (koe5/data/dataset.py) and takes its own equal slice, so no
rank has to send indices to another.
"""

from __future__ import annotations


def batches_per_epoch(n_examples: int, batch_size: int) -> int:
    return n_examples // batch_size


def rank_slice(batch, rank: int, world_size: int):
    """This rank's equal share of a global batch (an index array or a koe5.data.dataset.Batch)."""
    per_rank = len(batch) // world_size
    return batch[rank * per_rank:(rank + 1) * per_rank]
