"""The training loop: one process per rank, started by koe5/launch.py, reading the frozen spec.

It never touches the registry. It writes into the run directory, which the orchestrator (koe5/run.py)
folds into the registry:
    train_log.jsonl     one diagnostics row at the first step, every train.log_every steps and at the last (rank 0),
                        also sent to the trackers of train.report_to (koe5/track.py)
    eval_log.jsonl      with eval.every: the metrics of each evaluation during training, per benchmark
                        (koe5/train/evaluation.py); best/ holds the best step's weights (train.keep_best)
    checkpoints/        every train.save_every steps (koe5/train/checkpoint.py); a restart resumes from them
    data_mix.json       examples and tokens drawn per source
    model/              the exported sentence-transformers + Hugging Face model (with train.keep_best: the best
                        step evaluated, else the last)
    train_summary.json  steps done, seconds, evaluation seconds, the best step and where training stopped early
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from koe5 import track
from koe5.data.batches import rank_slice
from koe5.data.dataset import load_training_data, to_device
from koe5.data.prefetch import Prefetcher
from koe5.export import export_model, model_card
from koe5.model import EmbeddingModel, load_backbone, model_max_length, resolve_model_path
from koe5.spec.deepspeed import deepspeed_config, trainer_clips
from koe5.spec.schema import Spec
from koe5.train import checkpoint
from koe5.train.compile import compile_backbone
from koe5.train.guide import load_guide
from koe5.train.loss import GUIDE_MASKS, DistillConfig, GuideConfig, MatryoshkaConfig
from koe5.train.evaluation import DuringTraining, is_eval_step
from koe5.train.step import StepConfig, train_step


def init_distributed(device_type: str) -> tuple[int, int, int]:
    """(rank, local_rank, world_size). A single process started without a launcher gets a one-rank group,
    so the same DeepSpeed code path runs everywhere."""
    if device_type == "cpu":
        # Named, DeepSpeed does not warn on every run that it "was unable to detect" a GPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if "RANK" not in os.environ:
        from koe5.launch import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    # On the CPU, DeepSpeed builds its shared-memory op here and prints that it did, every run: say nothing.
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo", verbose=False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    release_shm_segment(rank, world)
    return rank, int(os.environ.get("LOCAL_RANK", 0)), world


def release_shm_segment(rank: int, world: int) -> None:
    """DeepSpeed's CPU backend maps a 66 MB /dev/shm segment per rank (for an inference-only all-reduce that
    training never calls) and never unlinks it, so every CPU run under its launcher kept that RAM until the
    machine ran out: a test suite of ~80 two-rank runs was killed by the OOM killer. Once every rank has
    mapped its peers' segments (they do so inside init, hence the barrier), each rank unlinks its own name;
    the mappings stay valid until the process exits, and then the memory is freed."""
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    if world > 1:
        torch.distributed.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


def pick_device(spec: Spec, local_rank: int) -> torch.device:
    want = spec.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{local_rank}") if want == "cuda" else torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(total_steps: int, warmup_ratio: float, kind: str):
    warmup = int(round(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


def attach_grad_norm(optimizer, model, max_norm: float | None) -> list:
    """Measure (and clip) the gradient norm just before each optimizer step; returns a one-item list
    holding the latest pre-clip norm. By then DeepSpeed has reduced the gradients over ranks."""
    latest: list = [None]
    params = [p for p in model.parameters() if p.requires_grad]

    def hook(_optimizer, _args, _kwargs):
        latest[0] = float(torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")))

    optimizer.register_step_pre_hook(hook)
    return latest


def build_model(spec: Spec, model_path: str) -> tuple[EmbeddingModel, torch.nn.Module, object]:
    """(model, backbone, tokenizer), ready to train. `from_pretrained` returns a module in eval mode, in
    which dropout is the identity and Hugging Face's gradient checkpointing is skipped: the model must be
    put in training mode explicitly, or `model.dropout` and `train.gradient_checkpointing` do nothing."""
    backbone, tokenizer = load_backbone(model_path, spec.model.dropout)
    if spec.train.gradient_checkpointing:
        # transformers 5 renamed the switch (the old name warns, and goes in v6).
        if hasattr(backbone, "activation_checkpointing_enable"):
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.train.freeze_embeddings:
        backbone.get_input_embeddings().weight.requires_grad_(False)
    if spec.train.compile:  # in place: parameter names, checkpoints and the export are unchanged
        backbone.koe5_compiles = compile_backbone(backbone)
    model = EmbeddingModel(backbone, spec.model.pooling, spec.model.normalize, spec.model.attention)
    if model.replaced_attention_dropout and int(os.environ.get("RANK", "0")) == 0:
        print(f"model.attention: varlen has no attention dropout: the model's attention dropout of "
              f"{model.replaced_attention_dropout:g} is off in this training run (hidden dropout stays)")
    model.train()
    return model, backbone, tokenizer


def build_engine(spec: Spec, model_path: str, world: int, total_steps: int):
    """(DeepSpeed engine, backbone, tokenizer, grad-norm holder): the model, AdamW, the warmup/decay
    schedule and the derived DeepSpeed config. Benchmarks build their engine here too, so they time the
    code that koe5-run trains with."""
    import deepspeed

    model, backbone, tokenizer = build_model(spec, model_path)
    # Only what trains: a frozen parameter (train.freeze_embeddings) must hold no optimizer state.
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.train.lr, weight_decay=spec.train.weight_decay,
                                  eps=spec.train.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, spec.train.warmup_ratio, spec.train.scheduler))
    grad_norm = attach_grad_norm(optimizer, model, spec.train.grad_clip) if trainer_clips(spec) else None
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(spec, world))
    return engine, backbone, tokenizer, grad_norm


def step_config(spec: Spec) -> StepConfig:
    loss = spec.loss
    guide = None
    if loss.guide_model is not None:  # guide_mask null: every kind of candidate the loss has
        guide = GuideConfig(margin=loss.guide_margin, margin_strategy=loss.guide_margin_strategy,
                            mask=tuple(loss.guide_mask if loss.guide_mask is not None else GUIDE_MASKS))
    matryoshka = None
    if loss.matryoshka_dims is not None:  # matryoshka_weights null: 1 each
        matryoshka = MatryoshkaConfig(dims=tuple(loss.matryoshka_dims),
                                      weights=tuple(loss.matryoshka_weights or [1.0] * len(loss.matryoshka_dims)))
    distill = DistillConfig(loss.distill_weight, loss.distill_temperature) if loss.distill_weight else None
    return StepConfig(loss_name=loss.name, temperature=loss.temperature,
                      mask_duplicates=loss.mask_duplicates, cross_device=loss.cross_device_negatives,
                      cache=spec.cache.enabled, chunk_size=spec.cache.chunk_size,
                      chunk_tokens=spec.cache.chunk_tokens, bf16=spec.train.precision == "bf16", guide=guide,
                      matryoshka=matryoshka, distill=distill)


def train(spec: Spec, spec_yaml: str, run_dir: Path, spec_hash: str = "") -> dict:
    import transformers
    from tqdm.auto import tqdm

    transformers.utils.logging.disable_progress_bar()  # one progress bar: training's

    device = pick_device(spec, int(os.environ.get("LOCAL_RANK", 0)))
    # Before the process group exists: transformers writes files only on rank 0 of an initialized group,
    # and whichever rank builds the demo model must write it.
    model_path = resolve_model_path(spec.model.name_or_path)
    guide_path = resolve_model_path(spec.loss.guide_model) if spec.loss.guide_model else None
    rank, local_rank, world = init_distributed(device.type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # The same seed on every rank gives identical initial weights; dropout then differs per rank.
    seed_everything(spec.seed)

    data = load_training_data(spec)
    total_steps = data.total_steps()

    engine, backbone, tokenizer, grad_norm = build_engine(spec, model_path, world, total_steps)
    # Outside deepspeed.initialize: the frozen guide holds no optimizer state and no ZeRO partition.
    guide = load_guide(spec, model_path, guide_path, device) if guide_path else None
    # Before the per-rank seed: building rank 0's evaluation model may draw from the global RNG.
    during = DuringTraining(spec, model_path, device, run_dir, rank)
    seed_everything(spec.seed * 1000 + rank)

    cfg = step_config(spec)
    log_path = run_dir / "train_log.jsonl"
    drawn: Counter = Counter()         # examples drawn per source, all ranks together
    drawn_tokens: Counter = Counter()  # their real tokens (query, positive, hard negatives)
    first_step = 0
    resume_from = checkpoint.latest(run_dir)
    if resume_from is not None:
        meta = checkpoint.load(engine, resume_from, rank=rank, world=world)
        first_step = meta["step"]
        drawn.update(meta["drawn"]["examples"])
        drawn_tokens.update(meta["drawn"]["tokens"])
        if rank == 0:
            _drop_log_rows_after(log_path, first_step)
            print(f"resumed from {resume_from} (step {first_step} of {total_steps})")
        during.resume(first_step)
    reporter = track.training(spec, spec_hash, run_dir, rank)  # train.report_to; rank 0 only
    start = time.perf_counter()
    window_start, window_triples, window_tokens = start, 0, 0
    bar = tqdm(total=total_steps, initial=first_step, desc="train", unit="step", disable=rank != 0,
               dynamic_ncols=True)
    result = None
    steps_done = first_step
    # data.prefetch: a thread builds the next batches on the host while this step trains (the same batches, in
    # order); on CUDA in page-locked memory, so the copy below does not block. 0 builds each one here.
    pinned = spec.data.prefetch > 0 and device.type == "cuda"

    def host_batch(step: int):
        batch = data.global_batch(step)
        rows = rank_slice(batch, rank, world)
        return batch, data.tokens_per_example(batch), rows, data.collate_host(rows, pin=pinned)

    steps = range(first_step, total_steps)
    with Prefetcher(host_batch, steps, spec.data.prefetch) as prepared:
        for step, (batch, tokens, rows, collated) in zip(steps, prepared):
            epoch = step // data.steps_per_epoch
            for k in np.unique(batch.source):
                drawn[data.names[k]] += int((batch.source == k).sum())
                drawn_tokens[data.names[k]] += int(tokens[batch.source == k].sum())
            queries, documents, doc_ids, n_tokens = to_device(collated, device, non_blocking=pinned)

            teacher = None if cfg.distill is None else torch.as_tensor(rows.scores, device=device)
            result = train_step(engine, queries, documents, doc_ids, cfg, device, guide_model=guide,
                                teacher_scores=teacher)

            window_triples += len(rows) * world
            window_tokens += n_tokens * world
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.4f}")
            # The first step too, so a curve starts where training does (its speed includes the warm-up).
            if rank == 0 and ((step + 1) % spec.train.log_every == 0 or step == 0 or step + 1 == total_steps):
                now = time.perf_counter()
                norm = grad_norm[0] if grad_norm is not None else engine.get_global_grad_norm()
                row = {
                    "step": step + 1, "epoch": epoch, "loss": result.loss, "lr": engine.get_lr()[0],
                    "grad_norm": None if norm is None else float(norm),
                    "triples_per_s": window_triples / (now - window_start),
                    "tokens_per_s": window_tokens / (now - window_start),
                    "margin": result.margin, "false_neg_frac": result.false_neg_frac,
                    **({} if guide is None else {"guide_masked": result.guide_masked,
                                                 "guide_masked_frac": result.guide_masked_frac}),
                    **({} if cfg.distill is None else {"distill_kl": result.distill_kl,
                                                       "distill_frac": result.distill_frac}),
                    # train.compile: graphs compiled so far; growing after the first steps means recompiles
                    **({"compiles": backbone.koe5_compiles.graphs} if spec.train.compile else {}),
                    "elapsed_s": now - start,
                }
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                reporter.log(row)
                bar.set_postfix(loss=f"{result.loss:.4f}", triples_s=f"{row['triples_per_s']:.1f}")
                window_start, window_triples, window_tokens = now, 0, 0
            steps_done = step + 1
            if is_eval_step(spec.eval.every, step + 1, total_steps) and during.evaluate(engine, step + 1):
                bar.write(f"stopping early after step {step + 1}: {during.best.metric} on {during.best.benchmark} "
                          f"has not improved for {during.best.patience} evaluations (best: step {during.best.step})")
                break
            save_every = spec.train.save_every
            if save_every and (step + 1) % save_every == 0 and step + 1 < total_steps:
                checkpoint.save(engine, run_dir, step + 1, rank=rank, world=world, spec_hash=spec_hash,
                                drawn={"examples": dict(drawn), "tokens": dict(drawn_tokens)},
                                keep=spec.train.keep_checkpoints)
                during.note_checkpoint()
    bar.close()
    reporter.close()

    weights = data.source_weights()
    data_mix = {name: {"examples": drawn[name], "tokens": drawn_tokens[name], "weight": weights.get(name)}
                for name in drawn}
    state = _full_state_dict(engine, spec)
    state = during.export_state() or state  # train.keep_best: the best step's weights, not the last
    if rank == 0:
        (run_dir / "data_mix.json").write_text(json.dumps(data_mix, indent=2, ensure_ascii=False))
        # The model's own limit, not the training truncation (model.passage_max_len): a user who loads
        # the export must not have long documents cut at a training-speed choice.
        max_seq_length = model_max_length(backbone.config, tokenizer)
        card = model_card(spec=spec, spec_yaml=spec_yaml, data_mix=data_mix, steps=total_steps, world_size=world,
                          max_seq_length=max_seq_length)
        export_model(backbone, tokenizer, run_dir / "model", pooling=spec.model.pooling,
                     normalize=spec.model.normalize, query_prefix=spec.model.query_prefix,
                     passage_prefix=spec.model.passage_prefix, max_seq_length=max_seq_length,
                     state_dict=state, card=card)
    summary = {"steps": steps_done, "total_steps": total_steps, "seconds": time.perf_counter() - start,
               "world_size": world, "final_loss": None if result is None else result.loss, **during.summary()}
    if rank == 0:
        (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _drop_log_rows_after(log_path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint; their old rows go, so each step logs once."""
    if not log_path.exists():
        return
    keep = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):
            pass  # a row torn by the crash
    tmp = log_path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, log_path)


def _full_state_dict(engine, spec: Spec) -> dict | None:
    """The backbone's full weights (gathered from ZeRO-3 partitions), keys without the `backbone.` prefix."""
    if spec.deepspeed.zero_stage == 3:
        full = engine._zero3_consolidated_16bit_state_dict()
    else:
        full = engine.module.state_dict()
    if full is None:  # ranks other than 0 under ZeRO-3
        return None
    return {k[len("backbone."):]: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu()
            for k, v in full.items() if k.startswith("backbone.")}
