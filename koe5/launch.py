"""Turn a frozen spec into the command that starts the training ranks, and run it.

DeepSpeed's launcher (or torchrun) does the real work of starting ranks; koe5 only builds its command
line. `local` runs a single rank as a plain subprocess.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from koe5.spec.schema import Spec


def resolve_backend(spec: Spec) -> str:
    if spec.launch.backend == "auto":
        return "local" if spec.launch.nproc_per_node == 1 else "deepspeed"
    return spec.launch.backend


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def training_command(spec: Spec, frozen_spec: Path, run_dir: Path, port: int | None = None) -> list[str]:
    entry = ["--spec", str(frozen_spec), "--run-dir", str(run_dir)]
    backend = resolve_backend(spec)
    n = spec.launch.nproc_per_node
    if backend == "local":
        return [sys.executable, "-m", "koe5.train", *entry]
    port = port or free_port()
    if backend == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n),
                "--master_port", str(port), "--module", "koe5.train", *entry]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
            "--master_port", str(port), "-m", "koe5.train", *entry]


def _die_with_parent() -> None:
    """Linux: the ranks get SIGTERM if the orchestrator dies (even by SIGKILL), so no orphan keeps training."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_training(command: list[str]) -> int:
    """Run the ranks in the foreground (their progress bars go straight to the terminal); returns the
    exit status. A rank that fails writes its reason to <run_dir>/error.txt."""
    proc = subprocess.Popen(command, preexec_fn=_die_with_parent)
    try:
        return proc.wait()
    except BaseException:
        # Ctrl-C or SIGTERM in the orchestrator: stop the ranks too, then let the caller record it.
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
