"""GradCache: a contrastive step whose memory does not grow with the batch.

1. Embed every chunk without grad, remembering each chunk's RNG state (CPU and device).
2. Compute the loss on the detached embeddings: this gives d(loss)/d(embedding) for every row.
3. Replay each chunk with grad under the same RNG state, chunk boundaries and precision, and backprop
   dot(embedding, cached gradient). Summed over chunks this is exactly the full-batch gradient.

Every replay is one `backward` on the engine; DeepSpeed runs in unmanaged accumulation mode, so the
optimizer `step()` that follows is the single accumulation boundary (see koe5/spec/deepspeed.py).
Under ZeRO-2/3 each forward and backward runs collectives, so every rank must run the same number of
chunks: ranks with fewer chunks run empty ones (a one-row forward whose gradient is multiplied by 0).

No host sync per chunk: each row's length comes from the host (`koe5.inputs.ModelInputs.lengths`, recorded
at collate time), so chunk widths are computed on the host, and every chunk's row indices go to the device in
one copy per pass. What remains per step: the chunk count agreed across ranks (`pad_chunk_count`, several
ranks only), and one read of the attention mask per batch when a caller passes a plain dict without lengths.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from koe5.inputs import padded_length

Batch = dict[str, torch.Tensor]
Chunk = Optional[torch.Tensor]  # row indices of the batch; None is an empty (padding) chunk


def row_chunks(n_rows: int, chunk_size: int) -> list[Chunk]:
    """Consecutive rows, `chunk_size` at a time."""
    return [torch.arange(s, min(s + chunk_size, n_rows)) for s in range(0, n_rows, chunk_size)]


def token_chunks(lengths: list[int], budget: int) -> list[Chunk]:
    """Rows sorted by length (longest first) and packed while rows x padded length fits `budget`:
    long rows get small chunks, short rows large ones, and padding inside a chunk stays small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks, current, width = [], [], 0
    for i in order:
        if current and (len(current) + 1) * width > budget:
            chunks.append(torch.tensor(current))
            current = []
        if not current:
            width = padded_length(lengths[i])  # the longest row of the chunk sets its width
        current.append(i)
    if current:
        chunks.append(torch.tensor(current))
    return chunks


def host_lengths(batch: Batch) -> list[int]:
    """Each row's real token count, on the host: the lengths the collate recorded (ModelInputs), else
    read from the attention mask (one device sync for the whole batch)."""
    lengths = getattr(batch, "lengths", None)
    return list(lengths) if lengths is not None else batch["attention_mask"].sum(1).tolist()


def make_chunks(batch: Batch, chunk_size: int, chunk_tokens: Optional[int]) -> list[Chunk]:
    if chunk_tokens:
        return token_chunks(host_lengths(batch), chunk_tokens)
    return row_chunks(len(batch["input_ids"]), chunk_size)


def pad_chunk_count(chunks: list[Chunk], device: torch.device) -> list[Chunk]:
    """Append empty chunks until every rank has as many chunks as the rank with the most."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return chunks
    count = torch.tensor([len(chunks)], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return chunks + [None] * (int(count.item()) - len(chunks))


def chunk_inputs(batch: Batch, chunks: list[Chunk]) -> list[tuple[Batch, Optional[torch.Tensor]]]:
    """For each chunk: its model inputs (its rows, trimmed to its longest row rounded up to a multiple of
    8) and its row indices on the batch's device (None for an empty chunk, which runs the batch's first row:
    any real input keeps the collectives of the forward and backward in step). Widths come from the host
    lengths and all indices travel in one copy, so no chunk waits for the device."""
    lengths = host_lengths(batch)
    device, full_width = batch["input_ids"].device, batch["attention_mask"].shape[1]
    host = torch.cat([torch.tensor([0]) if rows is None else rows for rows in chunks])
    sizes = [1 if rows is None else len(rows) for rows in chunks]
    if device.type == "cuda":  # page-locked, so the copy is queued on the stream instead of waiting for it
        host = host.pin_memory()
    on_device = host.to(device, non_blocking=True).split(sizes)
    flat = host.tolist()  # one conversion for all chunks (a host tensor: no device sync)
    out, start = [], 0
    for rows, index, size in zip(chunks, on_device, sizes):
        width = padded_length(max(lengths[i] for i in flat[start:start + size]), full_width)
        start += size
        out.append(({k: v[index, :width] for k, v in batch.items()}, None if rows is None else index))
    return out


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


def embed_without_grad(model: Callable[..., torch.Tensor], batch: Batch, chunks: list[Chunk],
                       device: torch.device) -> tuple[torch.Tensor, list[RngState]]:
    """Embeddings of every row (in batch order) and the RNG state before each chunk."""
    states, out = [], None
    with torch.no_grad():
        for inputs, rows in chunk_inputs(batch, chunks):
            states.append(RngState(device))
            emb = model(**inputs)
            if rows is None:
                continue
            if out is None:
                out = emb.new_empty((len(batch["input_ids"]), emb.shape[1]))
            out[rows.to(emb.device)] = emb
    return out, states


def replay(model: Callable[..., torch.Tensor], batch: Batch, chunks: list[Chunk], states: list[RngState],
           grad: torch.Tensor, backward: Callable[[torch.Tensor], None]) -> None:
    """Re-run each chunk with grad and backprop its cached embedding gradient."""
    for (inputs, rows), state in zip(chunk_inputs(batch, chunks), states):
        state.restore()
        emb = model(**inputs)
        chunk_grad = torch.zeros_like(emb) if rows is None else grad[rows.to(grad.device)].to(emb.dtype)
        backward((emb * chunk_grad).sum())
