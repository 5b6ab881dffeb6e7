"""One optimizer step of contrastive training on a DeepSpeed engine, with or without GradCache.

With a guide model (`loss.guide_model`, koe5/train/guide.py) the guide embeds the same chunks without
grad, after the model's no-grad pass (the guide is in eval mode and draws no random numbers, so the
replayed chunks see the dropout masks they saw before); its embeddings only mask candidates in the loss
(koe5/train/loss.py) and are never replayed.

Score distillation (`loss.distill_weight`) needs no model at all: the teacher's scores come with the batch
(`teacher_scores`), and its KL term is one more gradient on the same embeddings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from koe5.train.gradcache import embed_without_grad, make_chunks, pad_chunk_count, replay
from koe5.train.loss import DistillConfig, GuideConfig, LossResult, MatryoshkaConfig, contrastive_loss


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the step was not applied."""


@dataclass
class StepConfig:
    loss_name: str = "infonce"
    temperature: float = 0.02
    mask_duplicates: bool = True
    cross_device: bool = True
    cache: bool = True
    chunk_size: int = 32
    chunk_tokens: Optional[int] = None
    bf16: bool = False  # forwards under bf16 autocast; weights and gradients stay float32
    guide: Optional[GuideConfig] = None  # guided false-negative filtering; train_step then needs guide_model
    matryoshka: Optional[MatryoshkaConfig] = None  # the loss at several truncated widths
    distill: Optional[DistillConfig] = None  # score distillation; train_step then needs teacher_scores


def train_step(engine, queries: dict, documents: dict, doc_ids: torch.Tensor, cfg: StepConfig,
               device: torch.device, guide_model=None, teacher_scores: Optional[torch.Tensor] = None) -> LossResult:
    """Forward, loss, backward and optimizer step. `engine` is a DeepSpeed engine (or anything with
    __call__, backward and step); the batches are tokenized and already on `device`. `guide_model` is the
    frozen guide (an EmbeddingModel in eval mode, normalizing) when cfg.guide is set. `teacher_scores`
    ([b, 1 + n], NaN where none: koe5.data.dataset.Batch.scores) when cfg.distill is set."""
    if (cfg.guide is None) != (guide_model is None):
        raise ValueError("StepConfig.guide and guide_model go together: give both or neither")
    if (cfg.distill is None) != (teacher_scores is None):
        raise ValueError("StepConfig.distill and teacher_scores go together: give both or neither")
    loss_kwargs = dict(name=cfg.loss_name, temperature=cfg.temperature, mask_duplicates=cfg.mask_duplicates,
                       cross_device=cfg.cross_device, guide=cfg.guide, matryoshka=cfg.matryoshka,
                       teacher=teacher_scores, distill=cfg.distill)
    model = _autocast(engine, device) if cfg.bf16 else engine
    guide = None if guide_model is None else _autocast(guide_model, device) if cfg.bf16 else guide_model
    if cfg.cache:
        q_chunks = pad_chunk_count(make_chunks(queries, cfg.chunk_size, cfg.chunk_tokens), device)
        d_chunks = pad_chunk_count(make_chunks(documents, cfg.chunk_size, cfg.chunk_tokens), device)
        q_emb, q_states = embed_without_grad(model, queries, q_chunks, device)
        d_emb, d_states = embed_without_grad(model, documents, d_chunks, device)
        if guide is not None:  # the same chunks, once each, no grad; the RNG states are not needed
            loss_kwargs.update(guide_q=embed_without_grad(guide, queries, q_chunks, device)[0],
                               guide_d=embed_without_grad(guide, documents, d_chunks, device)[0])
        result = contrastive_loss(q_emb, d_emb, doc_ids, **loss_kwargs)
        _check_finite(result)
        replay(model, queries, q_chunks, q_states, result.grad_q, engine.backward)
        replay(model, documents, d_chunks, d_states, result.grad_d, engine.backward)
    else:
        q_emb = model(**queries)
        d_emb = model(**documents)
        if guide is not None:
            with torch.no_grad():
                loss_kwargs.update(guide_q=guide(**queries), guide_d=guide(**documents))
        result = contrastive_loss(q_emb, d_emb, doc_ids, **loss_kwargs)
        _check_finite(result)
        engine.backward((q_emb * result.grad_q).sum() + (d_emb * result.grad_d).sum())
    engine.step()
    return result


def _autocast(engine, device: torch.device):
    """`engine` with every forward under bf16 autocast: the matmuls run in bf16, the float32 weights get
    float32 gradients, and the no-grad pass and the replay see the same precision."""
    def forward(**batch):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return engine(**batch)
    return forward


def _check_finite(result: LossResult) -> None:
    # The loss value is all-reduced, so every rank takes the same branch and no collective is left waiting.
    if not math.isfinite(result.loss):
        raise NonFiniteLoss(f"the loss became {result.loss}; the step was not applied. "
                            "Lower train.lr, raise loss.temperature, or use bf16 instead of fp16.")
