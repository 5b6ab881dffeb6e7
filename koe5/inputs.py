"""How text becomes model inputs: prefix, truncate, pad. The one padding rule of koe5.

Training (the token cache's collate and GradCache's chunks), evaluation and the benchmarks all pad
through `padded_length`, so a model sees at evaluation exactly the shapes it saw in training.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

PAD_MULTIPLE = 8  # token lengths padded to a multiple of 8: trimmed odd lengths ran slower on the GPU


def padded_length(longest: int, max_len: Optional[int] = None) -> int:
    """The width a batch whose longest row has `longest` tokens is padded to: the next multiple of 8
    (at least 8), but never past `max_len` (a model's position table may end there, e.g. XLM-R's 514)
    unless a row is itself longer."""
    width = max(PAD_MULTIPLE, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
    if max_len is not None:
        width = min(width, max(max_len, longest))
    return width


class ModelInputs(dict):
    """`input_ids` and `attention_mask` (the keys a model is called with), plus `lengths`: each row's real
    token count as a host list. The tensors may move to the GPU; the lengths stay on the host, so GradCache
    cuts and trims its chunks without reading anything back from the device (koe5/train/gradcache.py).
    An attribute, not a key: `model(**inputs)` passes only the tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor], lengths: list[int]):
        super().__init__(tensors)
        self.lengths = lengths

    def to(self, device: torch.device, non_blocking: bool = False) -> "ModelInputs":
        return ModelInputs({k: v.to(device, non_blocking=non_blocking) for k, v in self.items()}, self.lengths)

    def pin_memory(self) -> "ModelInputs":
        """Page-locked copies, so a later `.to(cuda, non_blocking=True)` really runs asynchronously."""
        return ModelInputs({k: v.pin_memory() for k, v in self.items()}, self.lengths)


def pad_token_ids(sequences: list, pad_id: int, max_len: int) -> ModelInputs:
    """Token id sequences padded on the right to `padded_length` of the longest (lengths kept on the host)."""
    width = padded_length(max(len(x) for x in sequences), max_len)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.int64)
    for i, x in enumerate(sequences):
        input_ids[i, :len(x)] = torch.as_tensor(np.asarray(x, dtype=np.int64))
        attention_mask[i, :len(x)] = 1
    return ModelInputs({"input_ids": input_ids, "attention_mask": attention_mask}, [len(x) for x in sequences])


def tokenize(tokenizer, texts: list[str], prefix: str, max_len: int) -> ModelInputs:
    """Prefix, truncate to `max_len` tokens and pad (see pad_token_ids)."""
    ids = tokenizer([prefix + t for t in texts], max_length=max_len, truncation=True, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]
    return pad_token_ids(ids, tokenizer.pad_token_id, max_len)
