"""Unpadded ("varlen") attention for the BERT / XLM-R encoders (`model.attention: varlen`).

A padded batch of N rows x L tokens spends attention and every linear layer on its pad tokens. Packed, the
real tokens of all rows are one sequence of T tokens (1 x T), each row a segment: `cu_seqlens` (N + 1
offsets, int32) says where each segment starts, and attention runs within segments only. Everything but
attention (embeddings, linear layers, norms) is per token, so it needs no change.

- `pack` turns padded `input_ids` / `attention_mask` into the packed ids, the position ids the padded forward
  would have given each token (BERT: 0.., XLM-R: padding_idx + 1..) and the segment offsets.
- `varlen_attention` is registered with transformers' attention interface as `koe5_varlen`, the backbone's
  attention implementation under `model.attention: varlen`; transformers hands it each layer's query, key and
  value (1 x heads x T x head_dim) and our `cu_seq_lens_q` / `max_length_q` keyword arguments. On a GPU it calls
  `torch.nn.attention.varlen.varlen_attn` (FlashAttention's varlen kernel; bf16/fp16 only, no dropout). That
  kernel has no CPU implementation, so on the CPU the same packed path calls a reference: PyTorch's
  scaled_dot_product_attention with a block-diagonal mask (T x T, for tests and small runs only). The CPU
  tests therefore prove the packing, positions, segment pooling and gradients; the kernel itself runs only
  on a GPU.
- `segment_pool` pools each segment (mean or first token) back to one row per input row.

Attention dropout: the kernel has none. `use_varlen` therefore sets the self-attention modules' dropout
to 0 (the config keeps its value, so the export is the base model's config, as after a padded run) and
returns the probability it replaced, which the trainer reports; hidden dropout is untouched. With attention dropout 0 the padded and unpadded forwards are
the same function, which tests/test_attention.py checks (embeddings, gradients, weights after 3 steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

IMPLEMENTATION = "koe5_varlen"  # the name registered with transformers' AttentionInterface
SUPPORTED = ("bert", "roberta", "xlm-roberta")  # encoders whose positions `pack` knows how to reproduce


@dataclass
class Packed:
    """The real tokens of a padded batch as one sequence (see the module docstring)."""
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    cu_seqlens: torch.Tensor  # [N + 1] int32: segment i is tokens cu_seqlens[i]:cu_seqlens[i + 1]
    max_len: int  # the longest segment (the kernel's tiling needs it as a host number)
    segment: torch.Tensor  # [T] the row each token belongs to

    def attention_kwargs(self) -> dict:
        """The keyword arguments transformers passes through to the attention function, named as its own
        flash-attention varlen path names them."""
        return {"cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": self.max_len, "max_length_k": self.max_len}


def padded_positions(embeddings: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The position ids the backbone's embeddings compute for a right-padded batch when given none: XLM-R /
    RoBERTa count non-pad tokens from padding_idx + 1, BERT numbers columns from 0."""
    if hasattr(embeddings, "create_position_ids_from_input_ids"):
        return embeddings.create_position_ids_from_input_ids(input_ids, embeddings.padding_idx)
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)


def pack(embeddings: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Packed:
    """Pack the rows' real tokens (attention_mask 1; koe5 pads on the right) into one sequence."""
    mask = attention_mask.bool()
    lengths = mask.sum(1, dtype=torch.int32)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    keep = mask.flatten()
    positions = padded_positions(embeddings, input_ids).flatten()[keep]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).repeat_interleave(input_ids.shape[1])
    return Packed(input_ids=input_ids.flatten()[keep][None], position_ids=positions[None], cu_seqlens=cu_seqlens,
                  max_len=int(lengths.max()) if len(lengths) else 0, segment=rows[keep])


def segment_pool(hidden: torch.Tensor, packed: Packed, rows: int, pooling: str) -> torch.Tensor:
    """[T, H] token states -> [rows, H]: each segment's mean (sum / length, as the padded path's masked
    mean) or its first token (CLS)."""
    if pooling == "cls":
        return hidden[packed.cu_seqlens[:-1].long()]
    sums = hidden.new_zeros(rows, hidden.shape[-1]).index_add_(0, packed.segment, hidden)
    lengths = packed.cu_seqlens.diff().to(hidden.dtype).clamp(min=1)
    return sums / lengths[:, None]


def block_diagonal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[1, 1, T, T] boolean mask: token i may attend to token j when both lie in the same segment."""
    lengths = cu_seqlens.diff().long()
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths,
                                      output_size=total)
    return (segment[:, None] == segment[None, :])[None, None]


def varlen_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers' attention-function signature; query/key/value [1, heads, T, head_dim] of a packed batch.
    Returns ([1, T, heads, head_dim], None), as transformers' own attention functions do."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None or query.shape[0] != 1:
        raise ValueError("koe5's varlen attention runs packed batches only (koe5.model.EmbeddingModel with "
                         "attention 'varlen' packs them); this call passed a padded batch")
    if dropout:
        raise ValueError("varlen attention has no attention dropout; koe5.attention.use_varlen sets it to 0")
    if query.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        # [1, H, T, D] -> [T, H, D], the kernel's layout
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
        max_len = kwargs["max_length_q"]
        out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale=scaling)
        return out[None], None
    # The CPU reference: the same segments as a block-diagonal mask over the packed sequence.
    mask = block_diagonal_mask(cu_seqlens, query.shape[2])
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2), None


def register() -> None:
    """Make `koe5_varlen` a name transformers' attention dispatch knows (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, varlen_attention)


def use_varlen(backbone: nn.Module) -> float:
    """Switch `backbone`'s attention to `koe5_varlen` and its attention dropout off; returns the attention
    dropout probability that was replaced (0.0 when it was already off). Raises ValueError naming
    `model.attention` for an architecture whose packing koe5 does not know."""
    model_type = getattr(backbone.config, "model_type", "?")
    if model_type not in SUPPORTED:
        raise ValueError(f"model.attention: varlen supports {', '.join(SUPPORTED)} encoders; this model is "
                         f"{model_type!r}: use model.attention: padded")
    register()
    replaced = 0.0
    for layer in backbone.modules():  # the self-attention modules, holding the Dropout they pass on as `dropout`
        if hasattr(layer, "attention_head_size") and isinstance(getattr(layer, "dropout", None), nn.Dropout):
            replaced = max(replaced, layer.dropout.p)
            layer.dropout.p = 0.0
    backbone.set_attn_implementation(IMPLEMENTATION)
    return replaced
