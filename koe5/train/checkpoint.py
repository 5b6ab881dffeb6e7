"""Checkpoints that a killed run resumes from exactly, and the rules for what may change on resume.

Layout under <run_dir>/checkpoints/:
    step-00000004/        DeepSpeed's checkpoint (weights, optimizer, scheduler, loss scaler) plus
                          rng-rank<r>.pt (python, numpy, torch CPU and CUDA states of rank r) and koe5.json
                          (step, world size, spec hash, examples and tokens drawn per source)
    latest.json           {"tag": "step-00000004"}: the newest complete checkpoint
    .partial/             a checkpoint being written
    .trash/               checkpoints being deleted (renamed here first, so none is ever half-deleted in place)

A checkpoint is written into .partial/ and renamed into place only when every rank has finished its part;
latest.json is replaced atomically after that. latest.json is the only record of which checkpoint a run
resumes from: a step-* directory it does not name is not trusted. A write, publish or prune interrupted at
any point leaves latest.json naming a complete checkpoint (the previous one or the new one; none before
the first):
    - killed while writing .partial/: latest.json still names the previous checkpoint; the next save
      deletes .partial/ first;
    - killed after renaming step-N into place but before replacing latest.json: step-N is stale (latest.json
      names an older step), the resumed run repeats the steps up to N and publishes step-N again, which
      replaces the stale directory (`_publish`);
    - killed while pruning: directories are deleted by renaming them into .trash/ first, so each is either
      complete under its step-* name or gone from the step-* names; what a crash leaves in .trash/ goes at
      the next prune.
Nothing ever deletes the checkpoint latest.json names. The data order is a pure function of (seed, step),
so the step is the sampler's whole position.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest.json"
PARTIAL = ".partial"
TRASH = ".trash"
TAG = re.compile(r"step-(\d+)")


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
    target = root / tag
    if target.exists():
        # A step-N left by a run killed between the rename below and the replacement of latest.json: that
        # run's resume repeats the steps after the checkpoint latest.json names and arrives here again, and
        # a plain rename onto the non-empty step-N would fail ("Directory not empty") at every later try.
        if _latest_tag(root) == tag:
            # Never reached by the trainer (a resumed run only publishes steps after the one it resumed
            # from), and the one directory that must never be deleted.
            raise FileExistsError(f"{target} is the checkpoint {root / LATEST} names; not replacing it")
        _discard(root, [tag])  # a crash from here to the rename leaves step-N absent: latest.json is unchanged
    written.rename(target)
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(json.dumps({"tag": tag}))
    os.replace(tmp, root / LATEST)


def _latest_tag(root: Path) -> str | None:
    try:
        return json.loads((root / LATEST).read_text())["tag"]
    except (OSError, ValueError, KeyError):
        return None


def _step_of(name: str) -> int | None:
    m = TAG.fullmatch(name)
    return int(m.group(1)) if m else None


def _prune(root: Path, keep: int) -> None:
    """Keep the `keep` newest checkpoints up to the one latest.json names (always that one); delete the
    older ones and any newer than it. A newer one is stale: written by an earlier attempt that was killed
    before naming it in latest.json (with a changed train.save_every the resumed run may never publish that
    step again). Counting it among the newest would push out the checkpoint latest.json names."""
    current = _latest_tag(root)
    current_step = _step_of(current) if current else None
    if current_step is None or not (root / current).is_dir():
        return  # nothing known to be complete: delete nothing
    steps = sorted((s, p.name) for p in root.iterdir() if p.is_dir() and (s := _step_of(p.name)) is not None)
    older = [name for s, name in steps if s <= current_step]
    stale = [name for s, name in steps if s > current_step]
    doomed = [name for name in older[:-keep] if name != current] + stale
    _discard(root, doomed)


def _discard(root: Path, names: list[str]) -> None:
    """Delete checkpoint directories so that a crash at any point leaves each one either complete under its
    name or gone from the step-* names (an rmtree in place, interrupted, leaves a torn step-N): each is first
    renamed into .trash/ (atomic), then .trash/ is deleted, with whatever an earlier crash left there."""
    trash = root / TRASH
    shutil.rmtree(trash, ignore_errors=True)
    trash.mkdir(exist_ok=True)
    for name in names:
        (root / name).rename(trash / name)
    shutil.rmtree(trash, ignore_errors=True)


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_dir(run_dir)
    tag = _latest_tag(root)
    if tag is None:
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
