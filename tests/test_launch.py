"""Launch commands for one and several nodes, `koe5-run --emit`, and the pre-flight checks."""

import os
import socket
import subprocess
import sys
from pathlib import Path

from koe5.spec import load_frozen

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"


def koe5_run(*args, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "koe5.run", str(QUICKSTART), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "KOE5_REGISTRY": str(tmp / "r.duckdb")})


def frozen_path(stderr: str) -> Path:
    return Path(next(l for l in stderr.splitlines() if l.startswith("# frozen spec: ")).split(": ", 1)[1])


def test_emit_slurm_starts_one_launcher_per_node_on_the_frozen_spec(tmp_path):
    proc = koe5_run("launch.nnodes=4", "launch.nproc_per_node=8", "train.batch_size=64", "cache.chunk_size=2",
                    f"output_dir={tmp_path}", "--emit", "slurm", tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    assert "#SBATCH --nodes=4" in script and "#SBATCH --ntasks-per-node=1" in script
    assert "#SBATCH --gpus-per-node=8" in script
    assert "srun --ntasks-per-node=1" in script
    assert "deepspeed.launcher.runner --no_ssh --node_rank $SLURM_NODEID --num_nodes 4 --num_gpus 8" in script
    frozen = frozen_path(proc.stderr)
    assert f"--spec {frozen} " in script and frozen.exists()
    assert load_frozen(frozen).spec.launch.nnodes == 4  # every rank reads this file as it is
    assert not (tmp_path / "r.duckdb").exists()  # nothing ran, nothing recorded


def test_emit_torchrun_and_deepspeed_commands(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    two_nodes = ["launch.nnodes=2", "launch.nproc_per_node=8", "train.batch_size=64", "cache.chunk_size=2",
                 f"output_dir={tmp_path}"]
    torchrun = koe5_run(*two_nodes, "launch.master_addr=10.0.0.1", "--emit", "torchrun", tmp=tmp_path)
    assert torchrun.returncode == 0, torchrun.stderr
    assert "torch.distributed.run --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d " \
           "--rdzv_endpoint 10.0.0.1:29500 --node_rank $NODE_RANK -m koe5.train" in torchrun.stdout
    ds = koe5_run(*two_nodes, f"launch.hostfile={hostfile}", "--emit", "deepspeed", tmp=tmp_path)
    assert ds.returncode == 0, ds.stderr
    assert f"--hostfile {hostfile} --num_nodes 2 --num_gpus 8" in ds.stdout


def test_preflight_refuses_an_unwritable_output_dir_and_a_busy_port(tmp_path):
    proc = koe5_run("output_dir=/proc/koe5-runs", tmp=tmp_path)  # not even root can create it
    assert proc.returncode == 2 and "is not writable" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r.duckdb").exists()

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = koe5_run("launch.nproc_per_node=2", "train.batch_size=32", "cache.chunk_size=8",
                        f"launch.master_port={port}", f"output_dir={tmp_path / 'runs'}", tmp=tmp_path)
    assert proc.returncode == 2 and f"launch.master_port {port} is in use" in proc.stderr
