"""koe5-run's record of a run's life: SIGTERM -> killed, SIGKILL -> crashed (stale heartbeat), and a spec
that fails validation records nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"


def start_long_run(tmp_path: Path, **env_extra) -> tuple[subprocess.Popen, Path]:
    registry = tmp_path / "koe5.duckdb"
    env = {**os.environ, "KOE5_REGISTRY": str(registry), "KOE5_HEARTBEAT_S": "0.5", **env_extra}
    # Output goes to a file, not a pipe: nobody reads a pipe while the run trains, and once its 64 KiB
    # buffer fills (progress bars, "heartbeat skipped" lines) the run blocks on a write and never exits.
    with open(tmp_path / "run.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "koe5.run", str(QUICKSTART), "train.max_steps=100000", "eval.baseline=false",
             f"output_dir={tmp_path / 'runs'}"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return proc, registry


def ls(registry: Path, **env_extra) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "koe5.cli", "ls", "--json"], capture_output=True, text=True,
                         env={**os.environ, "KOE5_REGISTRY": str(registry), **env_extra}, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_for_training(registry: Path, proc: subprocess.Popen, timeout: float = 300) -> dict:
    """Until the run is `running` and its first training-log rows were folded in."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, (registry.parent / "run.log").read_text(errors="replace")[-3000:]
        logs = list((registry.parent / "runs").glob("*/train_log.jsonl"))
        if registry.exists() and logs:
            runs = ls(registry)
            if runs and runs[0]["status"] == "running":
                return runs[0]
        time.sleep(1)
    raise AssertionError("the run never started training")


def test_sigterm_records_killed_with_the_reason(tmp_path):
    proc, registry = start_long_run(tmp_path)
    run = wait_for_training(registry, proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    [after] = ls(registry)
    assert after["run_id"] == run["run_id"]
    assert after["status"] == "killed"
    from koe5.registry import Registry

    assert "SIGTERM" in Registry(registry).get_run(run["run_id"])["error"]


def test_sigkill_shows_crashed_once_the_heartbeat_is_stale(tmp_path):
    proc, registry = start_long_run(tmp_path)
    wait_for_training(registry, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    time.sleep(4)
    # the training rank died with its orchestrator instead of training on as an orphan
    orphans = subprocess.run(["pgrep", "-f", f"koe5.train.*{tmp_path}"], capture_output=True, text=True)
    assert orphans.stdout.strip() == ""
    [run] = ls(registry, KOE5_HEARTBEAT_TIMEOUT="3")
    assert run["status"] == "crashed"
    [run] = ls(registry)  # with the default 60 s timeout it is still presumed alive
    assert run["status"] == "running"


def test_invalid_spec_records_nothing(tmp_path):
    registry = tmp_path / "koe5.duckdb"
    proc = subprocess.run([sys.executable, "-m", "koe5.run", str(QUICKSTART), "data.sources[0].path=/nope.jsonl"],
                          capture_output=True, text=True, env={**os.environ, "KOE5_REGISTRY": str(registry)},
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "data.sources[0].path" in proc.stderr and "Traceback" not in proc.stderr
    assert not registry.exists()


@pytest.mark.parametrize("model, says", [
    ("/no/such/model", "/no/such/model is not a directory"),
    ("no-such-org/no-such-model", "cannot load 'no-such-org/no-such-model'"),  # a hub id, offline
    (".", "a directory needs config.json"),  # a directory, but not a model's
])
def test_a_model_that_does_not_load_is_one_line_naming_the_key(tmp_path, model, says):
    registry = tmp_path / "koe5.duckdb"
    proc = subprocess.run([sys.executable, "-m", "koe5.run", str(QUICKSTART), f"model.name_or_path={model}",
                           f"output_dir={tmp_path / 'runs'}"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "KOE5_REGISTRY": str(registry), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "model.name_or_path" in proc.stderr and says in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not registry.exists() or ls(registry) == []


def test_a_diverging_loss_stops_the_run_and_marks_it_failed(tmp_path):
    registry = tmp_path / "koe5.duckdb"
    proc = subprocess.run(
        [sys.executable, "-m", "koe5.run", str(QUICKSTART), "train.lr=1e30", "train.warmup_ratio=0",
         "train.max_steps=40", "eval.baseline=false", f"output_dir={tmp_path / 'runs'}"],
        capture_output=True, text=True, env={**os.environ, "KOE5_REGISTRY": str(registry)}, cwd=ROOT, timeout=600)
    assert proc.returncode == 1
    assert "the loss became nan" in proc.stderr and "Traceback" not in proc.stderr
    [run] = ls(registry)
    assert run["status"] == "failed"
    from koe5.registry import Registry

    assert "loss became nan" in Registry(registry).get_run(run["run_id"])["error"]
    assert Registry(registry).get_run(run["run_id"])["metrics"] == []


def test_a_killed_run_resumes_from_its_checkpoint_when_the_spec_is_run_again(tmp_path):
    from koe5.registry import Registry
    from koe5.train import checkpoint

    registry = tmp_path / "koe5.duckdb"
    env = {**os.environ, "KOE5_REGISTRY": str(registry), "KOE5_HEARTBEAT_S": "0.5"}
    args = [sys.executable, "-m", "koe5.run", str(QUICKSTART), "train.max_steps=40", "train.save_every=5",
            "train.log_every=1", "eval.baseline=false", f"output_dir={tmp_path / 'runs'}"]
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((tmp_path / "runs").glob("*/checkpoints/latest.json")):
        assert proc.poll() is None and time.time() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    [run] = ls(registry)
    assert run["status"] == "killed"
    [run_dir] = (tmp_path / "runs").glob("*")
    step = checkpoint.info(checkpoint.latest(run_dir))["step"]

    changed = subprocess.run([sys.executable, "-m", "koe5.run", "--resume", run["run_id"], "train.lr=0.5"],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert changed.returncode == 2 and "train.lr" in changed.stderr and "Traceback" not in changed.stderr

    again = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming from step {step}" in again.stdout
    [after] = ls(registry)
    assert after["run_id"] == run["run_id"] and after["status"] == "finished"
    steps = [r[0] for r in Registry(registry).query(
        "SELECT step FROM train_log WHERE run_id = ? ORDER BY step", [run["run_id"]])[1]]
    assert steps == list(range(1, 41))
    assert Registry(registry).get_run(run["run_id"])["error"] is None


def test_a_run_killed_after_its_baseline_resumes_when_the_spec_runs_again(tmp_path):
    """eval.baseline records a finished baseline before training starts. Running the same spec again after
    the training run was killed must resume that run from its checkpoint. Catches dedupe that counts any
    finished run of the spec hash: the baseline used to share it, and the rerun printed "already has a
    finished run ...; nothing to do" and exited 0 with the training run left killed."""
    registry = tmp_path / "koe5.duckdb"
    env = {**os.environ, "KOE5_REGISTRY": str(registry), "KOE5_HEARTBEAT_S": "0.5"}
    args = [sys.executable, "-m", "koe5.run", str(QUICKSTART), "train.max_steps=100000", "train.save_every=5",
            "eval.baseline=true", f"output_dir={tmp_path / 'runs'}"]
    with open(tmp_path / "run.log", "wb") as log:
        proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not list((tmp_path / "runs").glob("*/checkpoints/latest.json")):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "run.log").read_text(errors="replace")[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    runs = {r["kind"]: r for r in ls(registry)}
    assert runs["baseline"]["status"] == "finished" and runs["train"]["status"] == "killed"

    # Run the same spec again, for a few seconds: long enough to decide and start, not to finish 100,000 steps.
    with open(tmp_path / "rerun.log", "wb") as log:
        again = subprocess.Popen(args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while "resuming from step" not in (tmp_path / "rerun.log").read_text(errors="replace"):
        assert again.poll() is None and time.time() < deadline, (tmp_path / "rerun.log").read_text(errors="replace")
        time.sleep(0.5)
    again.send_signal(signal.SIGTERM)
    again.wait(timeout=120)
    text = (tmp_path / "rerun.log").read_text(errors="replace")
    assert f"interrupted run, {runs['train']['run_id']}" in text and "nothing to do" not in text
    assert sorted(r["kind"] for r in ls(registry)) == ["baseline", "train"]  # resumed in place, no new run


# How a SIGTERM can get lost while the ranks train: its exception raised inside an at-fork callback (Python
# prints "Exception ignored" and goes on; subprocess's fork runs logging's), or the signal taken by a thread
# other than the main one, whose wait for the ranks it does not interrupt.
LOST_SIGNAL = {
    "swallowed_at_fork": """
def sigterm_self_during_fork():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)  # the handler runs here, inside the at-fork callback, and its exception is swallowed
os.register_at_fork(after_in_parent=sigterm_self_during_fork)
""",
    "taken_by_another_thread": """
import threading
def sigterm_from_a_thread():
    time.sleep(2)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # this thread, not the main one, takes it
threading.Thread(target=sigterm_from_a_thread).start()
""",
}


@pytest.mark.parametrize("how", sorted(LOST_SIGNAL))
def test_a_sigterm_whose_exception_is_lost_still_stops_the_ranks(tmp_path, how):
    """The orchestrator's wait for its ranks ends within seconds of a SIGTERM however the signal arrives, and
    the ranks are stopped. Catches a blocking wait: a lost SIGTERM left the run training (a CI run of
    test_a_run_killed_after_its_baseline_resumes_when_the_spec_runs_again hung on it)."""
    script = tmp_path / "orchestrator.py"
    script.write_text(f"""
import os, signal, sys, time
from pathlib import Path
from koe5.launch import run_training
from koe5.orchestrate.lifecycle import Killed, raise_if_killed, signals_raise_killed
{LOST_SIGNAL[how]}
start = time.time()
with signals_raise_killed():
    try:
        rank = [sys.executable, "-c", "import time; time.sleep(120)", {str(tmp_path)!r}]  # named by tmp_path
        code = run_training(rank, check_stop=raise_if_killed)
        print("ranks exited", code)
    except Killed as e:
        print(f"killed ({{e}}) after {{time.time() - start:.1f}} s")
# Still in the orchestrator (its exit would stop the rank anyway, through PR_SET_PDEATHSIG): is the rank gone?
alive = 0
for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
    if cmdline.parent.name == str(os.getpid()):
        continue  # this script's own path names tmp_path too
    try:
        alive += {str(tmp_path)!r}.encode() in cmdline.read_bytes()
    except OSError:  # the process ended while we looked
        pass
print("ranks alive:", alive)
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=100,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "killed (received SIGTERM)" in out.stdout, out.stdout + out.stderr
    assert float(out.stdout.split(" after ")[1].split()[0]) < 30, out.stdout
    assert "ranks alive: 0" in out.stdout, out.stdout  # run_training stopped (and reaped) the rank
    if how == "swallowed_at_fork":  # the scenario happened: Python did swallow the handler's exception
        assert "Exception ignored" in out.stderr and "Killed: received SIGTERM" in out.stderr, out.stderr


def test_only_training_runs_decide_whether_a_spec_is_done(tmp_path):
    """A finished baseline under the training spec's hash (as koe5 recorded them before baselines got their
    own identity, so older registries hold them) neither skips nor blocks the resume of a killed training
    run. Catches dedupe or resume rules that look at runs of every kind."""
    from koe5.orchestrate.decide import decide
    from koe5.registry import Registry
    from koe5.train import checkpoint

    reg = Registry(tmp_path / "koe5.duckdb")
    reg.set_status(reg.create_run("x@init", "abc123", "{}", kind="baseline", status="running"), "finished")
    train = reg.create_run("x", "abc123", "{}", kind="train", status="running")
    reg.set_status(train, "killed")
    run_dir = tmp_path / "run"
    (checkpoint.checkpoint_dir(run_dir) / "step-00000005").mkdir(parents=True)
    (checkpoint.checkpoint_dir(run_dir) / "step-00000005" / "koe5.json").write_text(json.dumps({"step": 5}))
    (checkpoint.checkpoint_dir(run_dir) / "latest.json").write_text(json.dumps({"tag": "step-00000005"}))
    reg.add_artifact(train, "run_dir", str(run_dir))
    decision = decide(reg, "abc123", force=False)
    assert (decision.action, decision.run["run_id"]) == ("resume", train)
    reg.set_status(train, "finished")
    assert decide(reg, "abc123", force=False).action == "skip"
    assert decide(reg, "abc123", force=True).action == "new"
