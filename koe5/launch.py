"""Turn a frozen spec into the command that starts the training ranks, and run it.

DeepSpeed's launcher (or torchrun) does the real work of starting ranks; koe5 only builds its command
line. `local` runs a single rank as a plain subprocess.
"""

from __future__ import annotations

import shlex
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


def training_command(spec: Spec, frozen_spec: Path, run_dir: Path, port: int | None = None,
                     node_rank: str | None = None) -> list[str]:
    """The command that starts every rank on this node. `node_rank` (e.g. "$SLURM_NODEID") makes it the
    per-node form a cluster scheduler runs once on each node; without it, several nodes are reached from
    here through launch.hostfile (DeepSpeed's launcher logs in to each host)."""
    entry = ["--spec", str(frozen_spec), "--run-dir", str(run_dir)]
    backend = resolve_backend(spec)
    launch = spec.launch
    n = launch.nproc_per_node
    if backend == "local":
        return [sys.executable, "-m", "koe5.train", *entry]
    multi_node = launch.nnodes > 1
    port = launch.master_port or port or (29500 if multi_node else free_port())
    if backend == "deepspeed":
        command = [sys.executable, "-m", "deepspeed.launcher.runner"]
        if node_rank is not None:
            command += ["--no_ssh", "--node_rank", node_rank, "--num_nodes", str(launch.nnodes)]
        elif launch.hostfile:
            command += ["--hostfile", launch.hostfile, "--num_nodes", str(launch.nnodes)]
        command += ["--num_gpus", str(n), "--master_addr", launch.master_addr, "--master_port", str(port)]
        return command + ["--module", "koe5.train", *entry]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(launch.nnodes),
               "--nproc_per_node", str(n)]
    if multi_node:
        command += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{launch.master_addr}:{port}"]
        if node_rank is not None:
            command += ["--node_rank", node_rank]
    else:
        command += ["--master_port", str(port)]
    return command + ["-m", "koe5.train", *entry]


def slurm_script(spec: Spec, frozen_spec: Path, run_dir: Path) -> str:
    """An sbatch script: one launcher per node (srun --ntasks-per-node=1), every rank reading the same
    frozen spec. The first node of the allocation is the rendezvous host."""
    launch = spec.launch
    command = ["python", *training_command(spec, frozen_spec, run_dir, node_rank="$SLURM_NODEID")[1:]]
    # $SLURM_NODEID and $MASTER_ADDR must expand on each node, inside the task's shell.
    inner = " ".join(c if c.startswith("$") else shlex.quote(c) for c in command)
    inner = inner.replace(f" {shlex.quote(launch.master_addr)} ", ' "$MASTER_ADDR" ')
    inner = inner.replace(f"{shlex.quote(launch.master_addr)}:", '"$MASTER_ADDR":')
    task = "bash -c " + shlex.quote(inner)
    return f"""#!/bin/bash
#SBATCH --job-name={spec.name}
#SBATCH --nodes={launch.nnodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={launch.nproc_per_node}
#SBATCH --output={run_dir}/slurm-%j.out
# Written by `koe5-run --emit slurm`. Every rank reads the frozen spec {frozen_spec};
# outputs (train_log.jsonl, checkpoints/, model/) land in {run_dir}.
set -euo pipefail
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun --ntasks-per-node=1 {task}
"""


def _die_with_parent() -> None:
    """Linux: the ranks get SIGTERM if the orchestrator dies (even by SIGKILL), so no orphan keeps training."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_training(command: list[str], check_stop=lambda: None) -> int:
    """Run the ranks in the foreground (their progress bars go straight to the terminal); returns the
    exit status. A rank that fails writes its reason to <run_dir>/error.txt. `check_stop` is called every
    second and may raise to stop the ranks (the orchestrator's SIGTERM whose exception was lost)."""
    proc = None
    try:
        proc = subprocess.Popen(command, preexec_fn=_die_with_parent)
        while True:
            # Poll rather than block: a signal delivered to another thread of this process, or one whose
            # exception was swallowed, must still stop the ranks within a second.
            try:
                return proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                check_stop()
    except BaseException:
        if proc is None:
            raise
        # Ctrl-C or SIGTERM in the orchestrator: stop the ranks too, then let the caller record it.
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
