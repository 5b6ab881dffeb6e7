"""Checkpoints that a killed run resumes from exactly, and the rules for what may change on resume.

Layout under <run_dir>/checkpoints/:
    step-00000004/        DeepSpeed's checkpoint (weights, optimizer, scheduler, loss scaler) plus
                          rng-rank<r>.pt (python, numpy, torch CPU and CUDA states of rank r) and koe5.json
                          (step, world size, spec hash, examples and tokens drawn per source)
    latest.json           {"tag": "step-00000004"}: the newest complete checkpoint
    .partial/             a checkpoint being written

A checkpoint is written into .partial/ and renamed into place only when every rank has finished its part;
latest.json is replaced atomically after that. A write interrupted at any point leaves latest.json naming
the previous complete checkpoint. The data order is a pure function of (seed, step), so the step is the
sampler's whole position.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest.json"
PARTIAL = ".partial"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(engine, run_dir: Path, step: int, *, rank: int, world: int, spec_hash: str, drawn: dict,
         keep: int) -> Path:
    """Write the checkpoint of `step` (every rank calls this) and publish it atomically."""
    root = checkpoint_dir(run_dir)
    tag = f"step-{step:08d}"
    partial = root / PARTIAL
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # the remains of an interrupted write
        partial.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(partial), tag=tag, save_latest=False)
    torch.save(_rng_state(), partial / tag / f"rng-rank{rank}.pt")
    if rank == 0:
        (partial / tag / "koe5.json").write_text(json.dumps(
            {"step": step, "world_size": world, "spec_hash": spec_hash, "drawn": drawn}))
    _barrier()  # every rank's shards are on disk
    if rank == 0:
        _publish(root, partial / tag, tag)
        _prune(root, keep)
    _barrier()
    return root / tag


def _publish(root: Path, written: Path, tag: str) -> None:
    written.rename(root / tag)
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(json.dumps({"tag": tag}))
    os.replace(tmp, root / LATEST)


def _prune(root: Path, keep: int) -> None:
    tags = sorted(p.name for p in root.glob("step-*") if p.is_dir())
    for old in tags[:-keep]:
        shutil.rmtree(root / old, ignore_errors=True)


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_dir(run_dir)
    try:
        tag = json.loads((root / LATEST).read_text())["tag"]
    except (OSError, ValueError, KeyError):
        return None
    return root / tag if (root / tag / "koe5.json").exists() else None


def info(path: Path) -> dict:
    return json.loads((Path(path) / "koe5.json").read_text())


class CheckpointError(ValueError):
    """A checkpoint that this run cannot resume from; the message says why and what to do."""


def load(engine, path: Path, *, rank: int, world: int) -> dict:
    """Restore the engine and this rank's RNG states; returns the checkpoint's koe5.json."""
    meta = info(path)
    if meta["world_size"] != world:
        # ZeRO shards, per-rank RNG states and the rank slicing of each batch all depend on the world size.
        raise CheckpointError(f"checkpoint {path} was written by {meta['world_size']} ranks, this run has {world}; "
                         "resume with the original launch.nproc_per_node")
    engine.load_checkpoint(str(path.parent), tag=path.name)
    _set_rng_state(torch.load(path / f"rng-rank{rank}.pt", weights_only=False))
    return meta
