"""The guide model of guided false-negative filtering (`loss.guide_model`; the masking is in
koe5/train/loss.py): a frozen embedding model that rates every in-batch candidate.

The guide reads the model's own token ids (same prefixes, truncation and chunks), so it must tokenize
exactly as the model does: koe5 requires the same tokenizer rather than re-tokenizing the text for the
guide. `tokenizer_mismatch` checks that cheaply (tokenizers only, no weights) before a run is recorded and
again on every rank. The guide never trains: it is loaded outside deepspeed.initialize (no optimizer
state, no ZeRO partitions), in eval mode (no dropout) with requires_grad False, and embeds under no_grad.
"""

from __future__ import annotations

import torch

from koe5.model import EmbeddingModel, load_backbone, model_max_length

# Texts whose ids differ between tokenizers that share a vocabulary but normalize differently (case,
# accents, Hangul composition, spacing).
PROBES = ("query: 서울의 인구는 몇 명인가요?", "passage: Café DÉJÀ-VU 2026년 ㅎㅏㄴ글  tabs\tand  spaces")


def tokenizer_mismatch(model_tokenizer, guide_tokenizer) -> str | None:
    """Why the guide cannot read the model's token ids (a short reason), or None when it can."""
    if model_tokenizer.get_vocab() != guide_tokenizer.get_vocab():
        return (f"its vocabulary ({len(guide_tokenizer.get_vocab())} tokens) differs from the model's "
                f"({len(model_tokenizer.get_vocab())} tokens)")
    for text in PROBES:
        if model_tokenizer(text)["input_ids"] != guide_tokenizer(text)["input_ids"]:
            return f"it tokenizes {text!r} differently from the model"
    return None


def check_guide(spec, model_path: str, guide_path: str) -> str | None:
    """Everything about the guide that its tokenizer and config tell, without its weights: the same
    tokenizer as the model, and room for the training lengths. A reason, or None when it fits."""
    from transformers import AutoConfig, AutoTokenizer

    guide_tokenizer = AutoTokenizer.from_pretrained(guide_path)
    reason = tokenizer_mismatch(AutoTokenizer.from_pretrained(model_path), guide_tokenizer)
    if reason:
        return (f"{reason}; koe5 feeds the guide the model's token ids, so the guide needs the model's "
                "tokenizer (e.g. the base model itself)")
    longest = max(spec.model.query_max_len, spec.model.passage_max_len)
    limit = model_max_length(AutoConfig.from_pretrained(guide_path), guide_tokenizer)
    if limit < longest:
        return (f"it takes at most {limit} tokens, shorter than the training lengths (model.query_max_len / "
                f"model.passage_max_len up to {longest})")
    return None


def load_guide(spec, model_path: str, guide_path: str, device: torch.device) -> EmbeddingModel:
    """The frozen guide on `device`: the model's pooling, always normalized (its margins are in cosine
    units, as sentence-transformers' GISTEmbedLoss), eval mode, no parameter requiring grad."""
    reason = check_guide(spec, model_path, guide_path)
    if reason:
        raise ValueError(f"loss.guide_model: {spec.loss.guide_model}: {reason}")
    backbone, _ = load_backbone(guide_path)
    guide = EmbeddingModel(backbone, spec.model.pooling, normalize=True).to(device)
    guide.eval()
    guide.requires_grad_(False)
    return guide
