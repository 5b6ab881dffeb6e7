"""Evaluation during training (`eval.every`), the best step (`train.keep_best`) and early stopping.

Every rank calls `DuringTraining.evaluate` at the same steps, so they stay in lockstep:
- the full weights are gathered the way the export gathers them (`_full_state_dict`: under ZeRO-3 a
  collective every rank must join; at stages 0-2 every rank holds them, so only rank 0 reads them);
- rank 0 loads them into its own copy of the model, built once before training, and encodes the
  benchmarks with it (koe5/eval/model_eval.py's `evaluate_encoder`, the path koe5-run evaluates with).
  The training module is never switched to eval mode, so it stays in the training mode the trainer
  needs (dropout, gradient checkpointing); the copy costs one more set of weights on rank 0's device;
- rank 0 appends one row per benchmark to `<run_dir>/eval_log.jsonl` ({"step", "benchmark",
  "metrics": {"ndcg@10": fraction, ...}, "seconds"}), which the orchestrator folds into the registry;
- with `train.keep_best`, rank 0 saves the weights of each new best step under `<run_dir>/best/` and
  decides whether to stop; the decision is broadcast, so every rank leaves the loop at the same step.
  The other ranks wait in that broadcast while rank 0 evaluates (a collective's timeout, 30 min by
  default, bounds how long one evaluation may take).

Best weights and resume: a run resumed from the checkpoint of step S forgets the evaluations after S and
needs the best weights as of S. So `best/` keeps the current best and the best as of the newest
checkpoint (`note_checkpoint`), and a resumed run deletes the best files after S.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

BEST_DIR = "best"
EVAL_LOG = "eval_log.jsonl"
_BEST_FILE = re.compile(r"step-(\d+)\.safetensors")


def is_eval_step(every: Optional[int], step: int, total_steps: int) -> bool:
    """Evaluate after optimizer step `step` (1-based)? Every `every` steps and at the last one, so the
    curve ends where training does and the last step is a candidate for the best."""
    return every is not None and (step % every == 0 or step == total_steps)


@dataclass
class Best:
    """The best value of the watched metric so far, and how many evaluations since it improved."""
    benchmark: str
    metric: str  # NAME@K
    patience: Optional[int]
    step: Optional[int] = None
    value: Optional[float] = None
    since: int = 0  # evaluations in a row without a better value

    def update(self, step: int, value: float) -> bool:
        """Record an evaluation; True when it is a new best. A tie keeps the earlier step."""
        if self.value is None or value > self.value:
            self.step, self.value, self.since = step, value, 0
            return True
        self.since += 1
        return False

    def should_stop(self) -> bool:
        return self.patience is not None and self.since >= self.patience

    def replay(self, rows: list[dict]) -> None:
        """The state a resumed run continues from: every logged evaluation of the watched benchmark, in order."""
        for row in sorted((r for r in rows if r["benchmark"] == self.benchmark), key=lambda r: r["step"]):
            self.update(row["step"], row["metrics"][self.metric])

    def summary(self) -> dict:
        return {"benchmark": self.benchmark, "metric": self.metric, "step": self.step, "value": self.value}


def read_eval_log(path: Path) -> list[dict]:
    """The complete rows of an eval log (a row torn by a crash is left out)."""
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def best_file(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / BEST_DIR / f"step-{step:08d}.safetensors"


def save_best(run_dir: Path, step: int, state: dict, keep: set) -> None:
    """Write the weights of `step` (written then renamed, so a file under its name is complete) and delete
    the best files of steps not in `keep`."""
    from safetensors.torch import save_file

    path = best_file(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # clone: safetensors refuses tensors that share memory (tied weights)
    save_file({k: v.clone() for k, v in state.items()}, str(tmp))
    tmp.replace(path)
    prune_best(run_dir, keep | {step})


def prune_best(run_dir: Path, keep: set, after: Optional[int] = None) -> None:
    """Delete the best files of steps not in `keep` (with `after`: only those of steps after it)."""
    folder = Path(run_dir) / BEST_DIR
    for f in folder.glob("step-*.safetensors") if folder.is_dir() else []:
        step = int(_BEST_FILE.fullmatch(f.name).group(1))
        if step not in keep and (after is None or step > after):
            f.unlink()


class DuringTraining:
    """The evaluations of one training run, on every rank (see the module docstring)."""

    def __init__(self, spec, model_path: str, device: torch.device, run_dir: Path, rank: int):
        from koe5.spec.validate import during_benchmarks

        self.spec, self.run_dir, self.rank = spec, Path(run_dir), rank
        self.every = spec.eval.every
        self.seconds = 0.0  # wall time spent evaluating, this process's part of the run
        self.stopped_at: Optional[int] = None
        self.checkpoint_best: Optional[int] = None  # the best step as of the newest checkpoint
        names = during_benchmarks(spec)
        keep = spec.train.keep_best
        self.best = None
        if keep.metric is not None:
            name, k = keep.metric.strip().lower().split("@")
            self.best = Best(keep.benchmark or names[0], f"{name}@{int(k)}", keep.patience)
        self.encoder = self.benchmarks = self.settings = None
        if rank == 0 and self.every is not None:
            self._build(model_path, names, device)

    def _build(self, model_path: str, names: list[str], device: torch.device) -> None:
        """Rank 0's evaluation model and benchmarks. Built before training starts: loading a model may draw
        from the global RNG, which must stay the training's own."""
        from koe5.encoder import Encoder
        from koe5.eval.benchmark import load_benchmark
        from koe5.eval.model_eval import model_limit, resolve_lengths
        from koe5.model import EmbeddingModel, load_backbone
        from koe5.orchestrate.evaluation import encode_settings

        backbone, tokenizer = load_backbone(model_path)
        model = EmbeddingModel(backbone, self.spec.model.pooling, self.spec.model.normalize)
        self.encoder = Encoder(model, tokenizer, device=str(device), path=model_path, dtype=self.spec.eval.dtype)
        by_name = {b.name: b for b in self.spec.eval.benchmarks}
        self.benchmarks = [load_benchmark(by_name[n].path, name=n) for n in names]
        self.settings = resolve_lengths(encode_settings(self.spec), model_limit(self.encoder))

    def resume(self, step: int) -> None:
        """Continue from the checkpoint of `step`: forget later evaluations (rank 0 rewrites the log) and
        their best files, and take the best so far from the evaluations kept."""
        if self.rank != 0:
            return
        from koe5.train.trainer import _drop_log_rows_after

        log = self.run_dir / EVAL_LOG
        _drop_log_rows_after(log, step)
        prune_best(self.run_dir, set(), after=step)
        if self.best is not None:
            self.best.replay(read_eval_log(log))
            self.checkpoint_best = self.best.step

    def evaluate(self, engine, step: int) -> bool:
        """Evaluate after optimizer step `step` (every rank calls this); True when training should stop."""
        from koe5.eval.model_eval import evaluate_encoder
        from koe5.train.trainer import _full_state_dict

        start = time.perf_counter()
        stage3 = self.spec.deepspeed.zero_stage == 3
        state = _full_state_dict(engine, self.spec) if stage3 or self.rank == 0 else None
        stop = False
        if self.rank == 0:
            self.encoder.model.backbone.load_state_dict(state)
            results = evaluate_encoder(self.encoder, self.benchmarks, self.spec.eval.k, self.settings)
            with open(self.run_dir / EVAL_LOG, "a", encoding="utf-8") as f:
                for r in results:
                    metrics = {f"{m}@{k}": v for (m, k), v in sorted(r.metrics.aggregate.items())}
                    f.write(json.dumps({"step": step, "benchmark": r.benchmark, "metrics": metrics,
                                        "seconds": sum(r.seconds.values())}) + "\n")
                    if self.best is not None and r.benchmark == self.best.benchmark:
                        if self.best.update(step, metrics[self.best.metric]):
                            save_best(self.run_dir, step, state, keep={self.checkpoint_best})
            stop = self.best is not None and self.best.should_stop()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            decision = [stop]
            torch.distributed.broadcast_object_list(decision, src=0)
            stop = decision[0]
        if stop:
            self.stopped_at = step
        self.seconds += time.perf_counter() - start
        return stop

    def note_checkpoint(self) -> None:
        """A checkpoint was just published: a run resumed from it needs today's best file."""
        if self.best is not None:
            self.checkpoint_best = self.best.step

    def export_state(self) -> Optional[dict]:
        """The weights to export instead of the last step's (rank 0, train.keep_best): the best step's."""
        if self.rank != 0 or self.best is None or self.best.step is None:
            return None
        from safetensors.torch import load_file

        return load_file(str(best_file(self.run_dir, self.best.step)))

    def summary(self) -> dict:
        """What train_summary.json records of the evaluations."""
        return {"eval_seconds": self.seconds, "stopped_early_at": self.stopped_at,
                "best": None if self.best is None else self.best.summary()}
