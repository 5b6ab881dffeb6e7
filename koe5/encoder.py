"""Inference: an `EmbeddingModel` that turns texts into float32 numpy embeddings, for evaluation and
mining. It goes through `koe5.inputs.tokenize`, so the text a model sees at evaluation is exactly what it
saw in training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from koe5.fingerprint import weights_fingerprint
from koe5.inputs import tokenize
from koe5.model import EmbeddingModel, load_backbone, resolve_model_path


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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # eval.dtype -> the weights' dtype


class Encoder:
    """Inference: texts -> float32 numpy embeddings, batched by length. `dtype` (eval.dtype) is the weights'
    dtype: fp32, or bf16 (the weights cast once; EmbeddingModel still pools and normalizes in float32)."""

    def __init__(self, model: EmbeddingModel, tokenizer, device: str = "cpu", path: Optional[str] = None,
                 prefixes: Optional[dict] = None, dtype: str = "fp32"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.model = model.to(device=device, dtype=DTYPES[dtype]).eval()
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
               progress: bool | str = False, prefetch: bool = True) -> np.ndarray:
        """`prefetch`: tokenize the next batch in a second thread while the model runs this one (the Rust
        tokenizer releases the GIL); the batches, their order and so the embeddings are the same either way."""
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        # Sorting by length keeps padding per batch small; results go back in the caller's order.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), 0), dtype=np.float32)
        chunks = []
        starts = range(0, len(texts), batch_size)
        desc = progress if isinstance(progress, str) else "encode"
        use_autocast = self.device.startswith("cuda")

        def inputs(start: int) -> dict:
            idx = order[start:start + batch_size]
            return tokenize(self.tokenizer, [texts[i] for i in idx], prefix, max_len)

        # One worker: only it touches the tokenizer, so the tokenizer is never used by two threads at once.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="koe5-tokenize") as pool:
            pending = pool.submit(inputs, starts[0]) if prefetch and len(starts) else None
            for i, start in enumerate(tqdm(starts, desc=desc, disable=not progress, unit="batch")):
                if pending is None:
                    batch = inputs(start)
                else:
                    batch = pending.result()
                    pending = pool.submit(inputs, starts[i + 1]) if i + 1 < len(starts) else None
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                    chunks.append(self.model(**batch).float().cpu().numpy())
        if chunks:
            emb = np.concatenate(chunks)
            out = np.empty_like(emb)
            out[order] = emb
        return out


def load_encoder(name_or_path: str, pooling: Optional[str] = None, normalize: Optional[bool] = None,
                 device: str = "cpu", dtype: str = "fp32") -> Encoder:
    """An inference encoder. Pooling and normalization default to what the model directory says
    (sentence-transformers layout), else mean pooling with normalization (the E5 recipe)."""
    path = resolve_model_path(name_or_path)
    saved = read_st_settings(path)
    backbone, tokenizer = load_backbone(path)
    model = EmbeddingModel(backbone, pooling or saved.get("pooling", "mean"),
                           saved.get("normalize", True) if normalize is None else normalize)
    return Encoder(model, tokenizer, device=device, path=path, prefixes=saved.get("prefixes"), dtype=dtype)
