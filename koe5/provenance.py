"""Where a run came from: code version, library versions, host and the devices it ran on. Recorded with
every run (`koe5-run`'s training runs and baselines, `koe5 eval`'s baselines), so two numbers can be told
apart when they came from different machines (GPU evaluation runs under bf16 autocast, CPU in fp32)."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def provenance(world_size: int, device: str = "auto") -> dict:
    """`device` is where the work runs: "cpu", "cuda" or "auto" (cuda when available), as in the spec."""
    import torch

    from koe5 import __version__

    repo = Path(__file__).resolve().parents[1]

    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(repo), *cmd], capture_output=True, text=True,
                                  timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    on_gpu = device != "cpu" and torch.cuda.is_available()
    devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
               if on_gpu else [f"cpu ({os.cpu_count()} cores)"])
    return {
        "git_commit": commit,
        "git_dirty": bool(git("status", "--porcelain")) if commit else None,
        # Versions from package metadata: importing DeepSpeed only to read its version costs seconds.
        "versions": {"koe5": __version__, "torch": torch.__version__, "transformers": _version("transformers"),
                     "deepspeed": _version("deepspeed"), "python": platform.python_version()},
        "host": platform.node(),
        "devices": devices,
        "world_size": world_size,
    }
