"""Checks before a run is recorded or a model is loaded: problems that would otherwise surface hours in."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

from koe5.spec.schema import Spec

# Bytes per parameter in one checkpoint: fp32 weights + AdamW's two fp32 moments (+ the fp16 weights beside
# DeepSpeed's fp32 master copy under fp16; bf16 trains float32 weights), with 10% for the rest (scheduler,
# RNG states, file overhead).
BYTES_PER_PARAM = {"fp32": 12 * 1.1, "bf16": 12 * 1.1, "fp16": 14 * 1.1}


def checkpoint_bytes(spec: Spec) -> int | None:
    """Estimated size of one checkpoint, from the weight files of a local model; None if unknown."""
    from koe5.model import resolve_model_path

    path = Path(resolve_model_path(spec.model.name_or_path))
    weights = [p for p in path.glob("*") if p.suffix in (".safetensors", ".bin")] if path.is_dir() else []
    if not weights:
        return None
    params = sum(p.stat().st_size for p in weights) / 4  # stored as fp32
    return int(params * BYTES_PER_PARAM[spec.train.precision])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def preflight(spec: Spec) -> list[str]:
    """What stops this spec from running here; empty when it can start."""
    problems = []
    out = Path(spec.output_dir)
    try:  # the only sure test of writability is writing
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        problems.append(f"output_dir {out} is not writable ({e.strerror}); choose another with output_dir=DIR")
    else:
        need = checkpoint_bytes(spec) if spec.train.save_every else None
        free = shutil.disk_usage(out).free
        if need is not None and free < need:
            problems.append(f"output_dir {out} has {free / 2**30:.1f} GiB free, one checkpoint needs about "
                            f"{need / 2**30:.1f} GiB; free space or point output_dir elsewhere")
    launch = spec.launch
    if launch.master_port and launch.nnodes == 1 and launch.nproc_per_node > 1 and not port_free(launch.master_port):
        problems.append(f"launch.master_port {launch.master_port} is in use on this machine; choose another "
                        "or set it to null to pick a free one")
    return problems
