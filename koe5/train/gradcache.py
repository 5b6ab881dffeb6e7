"""GradCache: a contrastive step whose memory does not grow with the batch.

1. Embed every chunk without grad, remembering each chunk's RNG state (CPU and device).
2. Compute the loss on the detached embeddings: this gives d(loss)/d(embedding) for every row.
3. Replay each chunk with grad under the same RNG state, chunk boundaries and precision, and backprop
   dot(embedding, cached gradient). Summed over chunks this is exactly the full-batch gradient.

Every replay is one `backward` on the engine; DeepSpeed runs in unmanaged accumulation mode, so the
optimizer `step()` that follows is the single accumulation boundary (see koe5/spec/deepspeed.py).
"""

from __future__ import annotations

from typing import Callable

import torch

from koe5.model import PAD_MULTIPLE

Batch = dict[str, torch.Tensor]


def chunk_slices(n_rows: int, chunk_size: int) -> list[slice]:
    return [slice(s, min(s + chunk_size, n_rows)) for s in range(0, n_rows, chunk_size)]


def take_chunk(batch: Batch, rows: slice) -> Batch:
    """Rows of a padded batch, trimmed to the chunk's longest row rounded up to a multiple of 8."""
    mask = batch["attention_mask"][rows]
    longest = int(mask.sum(1).max().item()) if mask.numel() else 0
    width = min(mask.shape[1], max(PAD_MULTIPLE, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE))
    return {k: v[rows, :width] for k, v in batch.items()}


class RngState:
    """The CPU and (if used) CUDA generator states, so a replayed chunk draws the same dropout masks."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def embed_without_grad(model: Callable[..., torch.Tensor], batch: Batch, chunks: list[slice],
                       device: torch.device) -> tuple[torch.Tensor, list[RngState]]:
    states, parts = [], []
    with torch.no_grad():
        for rows in chunks:
            states.append(RngState(device))
            parts.append(model(**take_chunk(batch, rows)))
    return torch.cat(parts), states


def replay(model: Callable[..., torch.Tensor], batch: Batch, chunks: list[slice], states: list[RngState],
           grad: torch.Tensor, backward: Callable[[torch.Tensor], None]) -> None:
    """Re-run each chunk with grad and backprop its cached embedding gradient."""
    for rows, state in zip(chunks, states):
        state.restore()
        emb = model(**take_chunk(batch, rows))
        backward((emb * grad[rows].to(emb.dtype)).sum())
