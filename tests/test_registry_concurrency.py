"""Several processes writing while another polls `koe5 ls --json`; a SIGKILLed run reads as crashed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from koe5.registry import Registry

REPO = Path(__file__).resolve().parents[1]

WRITER = """
import json, sys, time
from pathlib import Path
from koe5.registry import Registry
reg = Registry(sys.argv[1]); i = int(sys.argv[2])
rid = reg.create_run(f"worker-{i}", f"hash-{i}", f"name: worker-{i}\\n", tags=["conc"])
reg.set_status(rid, "running")
log = Path(sys.argv[1]).parent / f"w{i}.jsonl"
for step in range(1, 9):
    with log.open("a") as f:
        f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\\n")
    reg.heartbeat(rid)
    if step % 4 == 0:
        reg.fold_train_log(rid, log)
reg.add_metrics(rid, "bench", {("ndcg", 10): i / 10, ("f1", 1): i / 20})
reg.add_artifact(rid, "model", f"/runs/{i}")
reg.set_status(rid, "finished")
print(rid)
"""

POLLER = """
import contextlib, io, json, sys, time
from koe5.cli import main
seen, polls, deadline = set(), 0, time.monotonic() + 120
while time.monotonic() < deadline:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["ls", "--json", "--registry", sys.argv[1]])
    if rc != 0 or err.getvalue():
        print("POLL FAILED", rc, err.getvalue()); sys.exit(1)
    runs = json.loads(out.getvalue()); polls += 1
    seen |= {r["run_id"] for r in runs if r["status"] == "finished"}
    if len(seen) == int(sys.argv[2]):
        break
print(json.dumps({"polls": polls, "seen": sorted(seen)}))
"""


def _spawn(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_four_writers_and_a_polling_reader(tmp_path):
    path = tmp_path / "reg.duckdb"
    Registry(path).create_sweep("warm-up", None, [])  # schema exists before the race starts
    poller = _spawn(POLLER, str(path), "4")
    writers = [_spawn(WRITER, str(path), str(i)) for i in range(1, 5)]
    run_ids = []
    for w in writers:
        out, err = w.communicate(timeout=180)
        assert w.returncode == 0, err
        assert "Traceback" not in err and "lock" not in err.lower(), err
        run_ids.append(out.strip())
    out, err = poller.communicate(timeout=180)
    assert poller.returncode == 0, out + err
    polled = json.loads(out.strip().splitlines()[-1])
    assert sorted(run_ids) == polled["seen"] and polled["polls"] >= 1

    reg = Registry(path)
    runs = reg.list_runs(tag="conc")
    assert {r["run_id"] for r in runs} == set(run_ids) and {r["status"] for r in runs} == {"finished"}
    for rid in run_ids:
        i = int(reg.get_run(rid)["name"].split("-")[1])
        run = reg.get_run(rid)
        assert {(m["metric"], m["k"]): m["value"] for m in run["metrics"]} == {("ndcg", 10): i / 10, ("f1", 1): i / 20}
        assert reg.query("SELECT count(*) FROM train_log WHERE run_id = ?", [rid])[1] == [(8,)]


HEARTBEATER = """
import sys, time
from koe5.registry import Registry
reg = Registry(sys.argv[1])
rid = reg.create_run("victim", "h", "", status="running")
print(rid, flush=True)
while True:
    reg.heartbeat(rid); time.sleep(0.2)
"""


def test_sigkilled_run_shows_crashed_within_the_timeout(tmp_path, monkeypatch):
    monkeypatch.setenv("KOE5_HEARTBEAT_TIMEOUT", "1.5")
    path = tmp_path / "reg.duckdb"
    child = _spawn(HEARTBEATER, str(path))
    rid = child.stdout.readline().strip()
    reg = Registry(path)
    time.sleep(1.0)
    assert reg.get_run(rid)["status"] == "running"  # alive and beating
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = time.monotonic()
    while reg.get_run(rid)["status"] != "crashed":
        assert time.monotonic() - killed_at < 1.5 + 1.0, "still running after the heartbeat timeout"
        time.sleep(0.1)
    assert reg.get_run(rid)["recorded_status"] == "running"
