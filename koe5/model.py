"""The encoder: a Hugging Face backbone plus pooling, used the same way for training and evaluation.

`EmbeddingModel` is the `nn.Module` that DeepSpeed wraps; `Encoder` is the inference front end that
evaluation uses (tokenize with a prefix, batch by length, no grad). Both go through `tokenize`, so the
text a model sees at evaluation is exactly what it saw in training.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

PAD_MULTIPLE = 8  # token lengths padded to a multiple of 8: trimmed odd lengths ran slower on the GPU


class EmbeddingModel(nn.Module):
    """Backbone -> pooled (and optionally L2-normalized) embeddings in float32."""

    def __init__(self, backbone: nn.Module, pooling: str = "mean", normalize: bool = True):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        # The loss and the metrics are computed in float32 whatever the weights' precision.
        pooled = pooled.float()
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled


def tokenize(tokenizer, texts: list[str], prefix: str, max_len: int) -> dict[str, torch.Tensor]:
    """Prefix, truncate to `max_len` tokens and pad (see pad_token_ids)."""
    ids = tokenizer([prefix + t for t in texts], max_length=max_len, truncation=True, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]
    return pad_token_ids(ids, tokenizer.pad_token_id, max_len)


def pad_token_ids(sequences: list, pad_id: int, max_len: int) -> dict[str, torch.Tensor]:
    """Token id sequences padded on the right to a multiple of 8, but never past `max_len` (a model's
    position table may end there, e.g. XLM-R's 514)."""
    longest = max(len(x) for x in sequences)
    width = min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, max(max_len, longest))
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.int64)
    for i, x in enumerate(sequences):
        input_ids[i, :len(x)] = torch.as_tensor(np.asarray(x, dtype=np.int64))
        attention_mask[i, :len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


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
    # The pooler head is never used (koe5 pools itself); leaving it out keeps every parameter trained,
    # which ZeRO's gradient partitioning expects.
    extra = {"add_pooling_layer": False} if config.model_type in ("bert", "roberta", "xlm-roberta") else {}
    # transformers reports the (intentionally) skipped pooler head as unexpected weights; say nothing.
    # Its per-tensor loading bar is noise too.
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        backbone = AutoModel.from_pretrained(path, config=config, attn_implementation="sdpa", **extra)
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return backbone, tokenizer


def read_st_settings(path: str) -> dict:
    """Pooling, normalization and prompts saved by sentence-transformers in a model directory, if any."""
    root = Path(path)
    out: dict = {}
    if not root.is_dir():
        return out
    pool_cfg = root / "1_Pooling" / "config.json"
    if pool_cfg.exists():
        cfg = json.loads(pool_cfg.read_text())
        out["pooling"] = "cls" if cfg.get("pooling_mode_cls_token") else "mean"
    modules = root / "modules.json"
    if modules.exists():
        out["normalize"] = any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))
    st_cfg = root / "config_sentence_transformers.json"
    if st_cfg.exists():
        prompts = json.loads(st_cfg.read_text()).get("prompts") or {}
        if prompts:
            out["prefixes"] = {"query": prompts.get("query", ""), "passage": prompts.get("passage", "")}
    return out


def weights_fingerprint(path: str) -> str:
    """Content hash of a model directory's weight files; a hub id hashes its name."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in root.glob("*") if p.suffix in (".safetensors", ".bin")) if root.is_dir() else []
    if not files:
        h.update(path.encode())
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


class Encoder:
    """Inference: texts -> float32 numpy embeddings, batched by length."""

    def __init__(self, model: EmbeddingModel, tokenizer, device: str = "cpu", path: Optional[str] = None,
                 prefixes: Optional[dict] = None):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.path = path
        self.prefixes = prefixes
        self._fingerprint: Optional[str] = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.path or "")
        return self._fingerprint

    @torch.no_grad()
    def encode(self, texts: list[str], prefix: str, max_len: int, batch_size: int = 64,
               progress: bool | str = False) -> np.ndarray:
        from tqdm.auto import tqdm

        # Sorting by length keeps padding per batch small; results go back in the caller's order.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), 0), dtype=np.float32)
        chunks = []
        starts = range(0, len(texts), batch_size)
        desc = progress if isinstance(progress, str) else "encode"
        use_autocast = self.device.startswith("cuda")
        for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
            idx = order[start:start + batch_size]
            batch = tokenize(self.tokenizer, [texts[i] for i in idx], prefix, max_len)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                chunks.append(self.model(**batch).float().cpu().numpy())
        if chunks:
            emb = np.concatenate(chunks)
            out = np.empty_like(emb)
            out[order] = emb
        return out


def load_encoder(name_or_path: str, pooling: Optional[str] = None, normalize: Optional[bool] = None,
                 device: str = "cpu") -> Encoder:
    """An inference encoder. Pooling and normalization default to what the model directory says
    (sentence-transformers layout), else mean pooling with normalization (the E5 recipe)."""
    path = resolve_model_path(name_or_path)
    saved = read_st_settings(path)
    backbone, tokenizer = load_backbone(path)
    model = EmbeddingModel(backbone, pooling or saved.get("pooling", "mean"),
                           saved.get("normalize", True) if normalize is None else normalize)
    return Encoder(model, tokenizer, device=device, path=path, prefixes=saved.get("prefixes"))
