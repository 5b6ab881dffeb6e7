"""The embedding model: a Hugging Face backbone plus pooling, the `nn.Module` that DeepSpeed wraps in
training and `koe5.encoder.Encoder` runs in evaluation.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class EmbeddingModel(nn.Module):
    """Backbone -> pooled (and optionally L2-normalized) embeddings in float32.

    `attention` (model.attention): `padded` runs the padded batch as it is; `varlen` packs the rows' real
    tokens into one sequence and attends within each row (koe5/attention.py), the same function without the
    pad tokens' work. varlen switches the backbone's attention dropout off (the kernel has none);
    `replaced_attention_dropout` keeps the probability it had, for the trainer to report."""

    def __init__(self, backbone: nn.Module, pooling: str = "mean", normalize: bool = True,
                 attention: str = "padded"):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if attention not in ("padded", "varlen"):
            raise ValueError(f"attention must be 'padded' or 'varlen', got {attention!r}")
        self.backbone = backbone
        self.pooling = pooling
        self.normalize = normalize
        self.attention = attention
        self.replaced_attention_dropout = 0.0
        if attention == "varlen":
            from koe5.attention import use_varlen

            self.replaced_attention_dropout = use_varlen(backbone)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.attention == "varlen":
            return self._forward_packed(input_ids, attention_mask)
        # Pooling, the loss and the metrics run in float32 whatever the weights' precision: a bf16 sum
        # over hundreds of tokens loses the low bits that separate close candidates.
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self._finish(pooled)

    def _forward_packed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """model.attention: varlen. The same embeddings as the padded forward, from the real tokens only."""
        from koe5.attention import pack, segment_pool

        packed = pack(self.backbone.embeddings, input_ids, attention_mask)
        # No attention mask: the segments (cu_seqlens) are the mask, and transformers builds none for an
        # attention implementation it has no mask function for.
        out = self.backbone(input_ids=packed.input_ids, position_ids=packed.position_ids,
                            **packed.attention_kwargs())
        hidden = out.last_hidden_state[0].float()  # float32 pooling, as in the padded forward
        return self._finish(segment_pool(hidden, packed, input_ids.shape[0], self.pooling))

    def _finish(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled


def resolve_model_path(name_or_path: str) -> str:
    """Map the builtin demo name to its (built on first use) directory; anything else passes through."""
    from koe5.demo_model import BUILTIN_NAME, build_demo_model

    if name_or_path == BUILTIN_NAME:
        return str(build_demo_model())
    return name_or_path


def load_backbone(name_or_path: str, dropout: Optional[float] = None):
    """(backbone, tokenizer) from a hub id, a local directory or the builtin demo name."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(path)
    if dropout is not None:
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
            if hasattr(config, key):
                setattr(config, key, dropout)
    # transformers' per-tensor loading bar is noise; and a checkpoint saved without the pooler head (koe5's
    # demo model, exports from before the head was kept) gets a freshly initialized one, which is not news.
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        # A head initialized at load draws from the CPU generator; the caller's random state stays as it was.
        with torch.random.fork_rng(devices=[]):
            backbone = AutoModel.from_pretrained(path, config=config, attn_implementation="sdpa")
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    set_pooler_aside(backbone)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return backbone, tokenizer


def set_pooler_aside(backbone: nn.Module) -> None:
    """Take the pooler head (BERT, XLM-R: a dense layer over the first token) out of the backbone and keep
    its weights, untouched, in `backbone.koe5_pooler_state` (keys as the full model names them).

    koe5 pools itself, so the head is never used; left in, its parameters would get no gradient, which
    ZeRO's gradient partitioning does not expect. `koe5.export.export_model` saves the weights back, so the
    export loads in transformers and sentence-transformers with no missing-weights report, as a model
    fine-tuned with sentence-transformers does. Only architectures that can run without the head (their
    constructor takes `add_pooling_layer`) lose it."""
    import inspect

    pooler = getattr(backbone, "pooler", None)
    if not isinstance(pooler, nn.Module):
        return
    if "add_pooling_layer" not in inspect.signature(type(backbone).__init__).parameters:
        return
    backbone.koe5_pooler_state = {f"pooler.{k}": v.detach().cpu().clone() for k, v in pooler.state_dict().items()}
    backbone.pooler = None


def model_max_length(config, tokenizer=None) -> int:
    """The longest input the model itself accepts: what evaluation and the export use by default, as
    MTEB evaluates (the training truncation, `model.passage_max_len`, is a training-speed choice only).
    The position table's size, less the padding offset of XLM-R-style models (514 rows -> 512 tokens),
    and no more than the tokenizer's declared `model_max_length` when it declares a real one."""
    positions = getattr(config, "max_position_embeddings", None) or 512
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        positions -= (getattr(config, "pad_token_id", 1) or 0) + 1
    declared = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    if isinstance(declared, int) and 0 < declared < 1_000_000:  # unset tokenizers say 1e30
        positions = min(positions, declared)
    return int(positions)
