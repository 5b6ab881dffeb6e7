"""Encode texts with several processes, each taking a contiguous slice: a large corpus is not encoded
by one rank alone.

`encode_sharded` writes the texts to a job directory and starts N copies of this module through
DeepSpeed's launcher (one per GPU, or N CPU processes). Rank r encodes slice r and saves it as
part-r.npy; the caller concatenates the parts in rank order. The ranks need no process group: the slices
are independent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def slice_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous, near-equal slices: the first n % world ranks get one extra text."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def encode_sharded(model_path: str, texts: list[str], prefix: str, max_len: int, *, nproc: int,
                   batch_size: int = 64, pooling: str | None = None, normalize: bool | None = None,
                   dtype: str = "fp32") -> np.ndarray:
    from koe5.launch import free_port

    with tempfile.TemporaryDirectory(prefix="koe5-encode-") as tmp:
        job = Path(tmp)
        (job / "job.json").write_text(json.dumps({
            "model": model_path, "texts": texts, "prefix": prefix, "max_len": max_len,
            "batch_size": batch_size, "pooling": pooling, "normalize": normalize, "dtype": dtype},
            ensure_ascii=False),
            encoding="utf-8")
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                   "--master_port", str(free_port()), "--module", "koe5.eval.shard", "--job", str(job)]
        proc = subprocess.run(command, capture_output=True, text=True)
        parts = [job / f"part-{r}.npy" for r in range(nproc)]
        if proc.returncode != 0 or not all(p.exists() for p in parts):
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"sharded encoding with {nproc} processes failed (exit {proc.returncode}):\n{tail}")
        arrays = [np.load(p) for p in parts]
        return np.concatenate([a for a in arrays if len(a)])  # a rank with an empty slice saved no columns


def main(argv: list[str] | None = None) -> int:
    import argparse

    import torch

    from koe5.encoder import load_encoder

    parser = argparse.ArgumentParser(prog="python -m koe5.eval.shard")
    parser.add_argument("--job", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    job = Path(args.job)
    spec = json.loads((job / "job.json").read_text(encoding="utf-8"))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the ranks share the cores
    start, stop = slice_bounds(len(spec["texts"]), world, rank)
    encoder = load_encoder(spec["model"], pooling=spec["pooling"], normalize=spec["normalize"], device=device,
                           dtype=spec["dtype"])
    emb = encoder.encode(spec["texts"][start:stop], spec["prefix"], spec["max_len"], spec["batch_size"],
                         progress=f"encode (rank {rank})" if rank == 0 else False)
    tmp = job / f".part-{rank}.npy"
    np.save(tmp, emb)
    tmp.rename(job / f"part-{rank}.npy")  # complete parts only
    return 0


if __name__ == "__main__":
    sys.exit(main())
