"""Registry API: lifecycle, metrics, train-log folding, filters, migrations, lock handling."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pytest

from koe5.registry import Registry, RegistryError, default_registry_path, effective_status
from koe5.registry import connect as connect_mod
from koe5.registry.store import new_id

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "reg.duckdb")


def _child(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE, text=True)


def test_default_path_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KOE5_REGISTRY", str(tmp_path / "x.duckdb"))
    assert default_registry_path() == tmp_path / "x.duckdb"
    monkeypatch.delenv("KOE5_REGISTRY")
    assert default_registry_path() == REPO / "registry" / "koe5.duckdb"


def test_lifecycle_timestamps_and_provenance(reg):
    rid = reg.create_run("exp", "h", "name: exp\n", tags=["a", "b"], output_dir="runs/x",
                         provenance={"git_commit": "abc", "git_dirty": True, "versions": {"torch": "2.13"},
                                     "host": "h0", "devices": ["cpu"], "world_size": 2},
                         ds_config={"train_batch_size": 8})
    run = reg.get_run(rid)
    assert run["status"] == "queued" and run["started_at"] is None and run["finished_at"] is None
    assert run["tags"] == ["a", "b"] and run["versions"] == {"torch": "2.13"} and run["world_size"] == 2
    assert run["git_dirty"] is True and run["ds_config"] == {"train_batch_size": 8}
    reg.set_status(rid, "running")
    started = reg.get_run(rid)["started_at"]
    assert started is not None
    reg.set_status(rid, "running")  # a second "running" keeps the first start time
    assert reg.get_run(rid)["started_at"] == started
    reg.set_status(rid, "killed", error="SIGTERM")
    run = reg.get_run(rid)
    assert run["status"] == "killed" and run["error"] == "SIGTERM" and run["finished_at"] >= started


def test_bad_status_kind_and_unknown_run(reg):
    with pytest.raises(RegistryError, match="status"):
        reg.create_run("x", "h", "", status="done")
    with pytest.raises(RegistryError, match="kind"):
        reg.create_run("x", "h", "", kind="other")
    with pytest.raises(RegistryError, match="create_run"):
        reg.set_status("nope", "running")


def test_run_ids_unique_and_time_sortable():
    ids = [new_id() for _ in range(500)]
    assert len(set(ids)) == len(ids)
    times = [i[:15] for i in ids]  # created one after another: the time part never goes backwards
    assert times == sorted(times)


def test_prefix_lookup(reg):
    a = reg.create_run("a", "h", "")
    b = reg.create_run("b", "h", "")
    assert reg.get_run(a)["name"] == "a"
    common = os.path.commonprefix([a, b])
    with pytest.raises(RegistryError, match="ambiguous"):
        reg.get_run(common)
    with pytest.raises(RegistryError, match="No run id starts or ends with"):
        reg.get_run("19990101")
    # LIKE wildcards in a prefix are literal characters, not patterns.
    with pytest.raises(RegistryError, match="No run id starts or ends with"):
        reg.get_run("%")


def test_a_run_is_named_by_id_name_suffix_or_latest(reg):
    first = reg.create_run("quickstart", "h", "")
    base = reg.create_run("quickstart@init", "h", "", kind="baseline")
    second = reg.create_run("quickstart", "h", "")
    later_base = reg.create_run("other@init", "h2", "", kind="baseline")
    assert reg.get_run("quickstart")["run_id"] == second  # a name: its newest run
    assert reg.get_run("quickstart@init")["run_id"] == base
    # `latest` is the newest training run, even when a baseline was recorded after it.
    assert reg.get_run("latest")["run_id"] == second != later_base
    # The random part the run id ends with, as `koe5-run` prints it.
    assert reg.get_run(first.rsplit("-", 1)[1])["run_id"] == first
    assert reg.get_run(first)["run_id"] == first
    with pytest.raises(RegistryError, match="ambiguous"):
        reg.get_run("")  # every id starts with the empty string


def test_latest_without_training_runs_is_the_newest_run(tmp_path):
    reg = Registry(tmp_path / "r.duckdb")
    base = reg.create_run("m@init", "h", "", kind="baseline")
    assert reg.get_run("latest")["run_id"] == base


def test_reading_a_missing_registry(tmp_path):
    reg = Registry(tmp_path / "none.duckdb")
    assert reg.list_runs() == [] and reg.find_runs("h") == []
    with pytest.raises(RegistryError):
        reg.get_run("x")
    assert not (tmp_path / "none.duckdb").exists()  # reading never creates the file


def test_crashed_when_heartbeat_is_stale(reg, monkeypatch):
    monkeypatch.setenv("KOE5_HEARTBEAT_TIMEOUT", "0.5")
    rid = reg.create_run("x", "h", "", status="running")
    assert reg.get_run(rid)["status"] == "running"
    time.sleep(0.7)
    run = reg.get_run(rid)
    assert run["status"] == "crashed" and run["recorded_status"] == "running"
    assert [r["run_id"] for r in reg.list_runs(status="crashed")] == [rid]
    reg.heartbeat(rid)
    assert reg.get_run(rid)["status"] == "running"
    reg.set_status(rid, "finished")
    time.sleep(0.7)
    assert reg.get_run(rid)["status"] == "finished"  # only running runs can look crashed


def test_effective_status_rule():
    from datetime import datetime, timedelta
    now = datetime(2026, 1, 1, 12)
    for _ in range(50):
        age, timeout = random.uniform(0, 100), random.uniform(1, 100)
        got = effective_status("running", now - timedelta(seconds=age), now=now, timeout_s=timeout)
        assert got == ("crashed" if age > timeout else "running")
    assert effective_status("failed", None, now=now, timeout_s=1) == "failed"


def test_metrics_validate_and_replace(reg):
    rid = reg.create_run("x", "h", "")
    reg.add_metrics(rid, "b1", {("ndcg", 10): 0.5, ("f1", 1): 0.25}, fingerprint="fp", evaluator_version="1")
    reg.add_metrics(rid, "b1", {("ndcg", 10): 0.75})
    got = {(m["metric"], m["k"]): m["value"] for m in reg.get_run(rid)["metrics"]}
    assert got == {("ndcg", 10): 0.75, ("f1", 1): 0.25}
    with pytest.raises(RegistryError, match=r"\[0, 1\]"):
        reg.add_metrics(rid, "b1", {("ndcg", 10): 75.0})
    with pytest.raises(RegistryError, match="Unknown metric"):
        reg.add_metrics(rid, "b1", {("acc", 1): 0.5})


def test_fold_train_log_torn_line_and_idempotent(reg, tmp_path):
    rid = reg.create_run("x", "h", "")
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "lr": 0.1, "custom": s * 2}) for s in range(1, 6)]
    log.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])  # the writer died mid-line
    assert reg.fold_train_log(rid, log) == 3
    assert reg.fold_train_log(rid, log) == 0
    log.write_text("\n".join(lines) + "\n")  # the line got completed and one more appended
    assert reg.fold_train_log(rid, log) == 2
    cols, rows = reg.query("SELECT step, loss, extra FROM train_log WHERE run_id = ? ORDER BY step", [rid])
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    assert [r[1] for r in rows] == pytest.approx([1.0 / s for s in range(1, 6)])
    assert json.loads(rows[4][2]) == {"custom": 10}
    log.write_text(lines[0] + "\n{broken\n" + lines[1] + "\n")
    with pytest.raises(RegistryError, match=r"log.jsonl:2"):
        reg.fold_train_log(rid, log)
    assert reg.fold_train_log(rid, tmp_path / "absent.jsonl") == 0


def test_list_runs_filters_and_sort(reg):
    rng = random.Random(1)
    sweep = reg.create_sweep("sw", "experiments/x.yaml", ["train.lr"])
    expected = {}
    for i in range(8):
        rid = reg.create_run(f"exp-{i}" if i % 2 else f"base-{i}", "h", "", tags=["even"] if i % 2 == 0 else ["odd"],
                             sweep_id=sweep if i < 3 else None)
        vals = [rng.random() for _ in range(2)]
        for b, v in zip(("b1", "b2"), vals):
            reg.add_metrics(rid, b, {("ndcg", 3): v})
        expected[rid] = sum(vals) / 2
        if i == 0:
            reg.set_status(rid, "failed", error="boom")
    ranked = [r["run_id"] for r in reg.list_runs(sort_metric="ndcg@3")]
    assert ranked == sorted(expected, key=lambda r: -expected[r])
    assert all(r["headline_mean"] == pytest.approx(expected[r["run_id"]]) for r in reg.list_runs(sort_metric="ndcg@3"))
    assert {r["name"] for r in reg.list_runs(name_glob="exp-*")} == {"exp-1", "exp-3", "exp-5", "exp-7"}
    assert {r["name"] for r in reg.list_runs(tag="even")} == {"base-0", "base-2", "base-4", "base-6"}
    assert len(reg.list_runs(sweep=sweep)) == 3 and len(reg.list_runs(sweep=sweep[:17])) == 3
    assert [r["name"] for r in reg.list_runs(status="failed")] == ["base-0"]
    assert reg.list_runs(name_glob="x'; DROP TABLE runs; --") == []  # parameters, not SQL text
    assert len(reg.list_runs()) == 8


def test_find_runs(reg):
    a = reg.create_run("a", "same", "")
    b = reg.create_run("b", "same", "")
    reg.create_run("c", "other", "")
    reg.set_status(b, "finished")
    assert [r["run_id"] for r in reg.find_runs("same")] == [a, b]  # oldest created first
    assert [r["run_id"] for r in reg.find_runs("same", status="finished")] == [b]


def test_additive_migration(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "m.duckdb")
    rid = reg.create_run("old", "h", "")
    schema = connect_mod.schema_path().read_text()
    versions = [v for v, _ in connect_mod.schema_sections(schema)]
    assert versions == list(range(1, len(versions) + 1))  # numbered 1, 2, ... in order
    nxt = versions[-1] + 1
    newer = tmp_path / "schema.sql"
    newer.write_text(schema + f"\n-- @version {nxt}\nALTER TABLE runs ADD COLUMN IF NOT EXISTS note VARCHAR;\n")
    monkeypatch.setattr(connect_mod, "schema_path", lambda: newer)
    reg.heartbeat(rid)  # any write migrates
    cols, rows = reg.query("SELECT version FROM schema_version ORDER BY version")
    assert [r[0] for r in rows] == versions + [nxt]
    _, rows = reg.query("SELECT name, note FROM runs")
    assert rows == [("old", None)]
    reg.heartbeat(rid)  # and only once
    assert len(reg.query("SELECT * FROM schema_version")[1]) == nxt


def test_a_registry_of_an_older_koe5_is_read_after_migrating(tmp_path, monkeypatch):
    """Catches reads that assume the newest schema: a registry written before a schema section existed
    (here: without the newest section's tables) must still be read by `get_run`, `list_runs` and `koe5
    show`, not fail with a DuckDB catalog error on a table it does not have yet."""
    schema = connect_mod.schema_path().read_text()
    sections = connect_mod.schema_sections(schema)
    older = tmp_path / "schema.sql"
    older.write_text("".join(f"-- @version {v}\n{sql}" for v, sql in sections[:-1]))
    fresh = Registry(tmp_path / "older.duckdb")
    monkeypatch.setattr(connect_mod, "schema_path", lambda: older)
    rid = fresh.create_run("old", "h", "")  # recorded by the older schema
    monkeypatch.undo()
    assert fresh.get_run(rid)["name"] == "old"
    assert [r["run_id"] for r in fresh.list_runs()] == [rid]
    _, rows = fresh.query("SELECT max(version) FROM schema_version")
    assert rows == [(sections[-1][0],)]


def test_reader_and_writer_wait_for_each_other(reg):
    rid = reg.create_run("x", "h", "")
    # A writer that holds the file for a second: the reader retries instead of failing.
    child = _child(f"""
        import duckdb, time
        con = duckdb.connect({str(reg.path)!r}); print("held", flush=True); time.sleep(1.0); con.close()
    """)
    assert child.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    assert reg.get_run(rid)["name"] == "x"
    assert time.monotonic() - t0 > 0.3
    child.wait()
    # A reader that holds the file: the writer retries.
    child = _child(f"""
        import duckdb, time
        con = duckdb.connect({str(reg.path)!r}, read_only=True); print("held", flush=True); time.sleep(1.0)
    """)
    assert child.stdout.readline().strip() == "held"
    reg.set_status(rid, "finished")
    child.wait()
    assert reg.get_run(rid)["status"] == "finished"


def test_bounded_wait_gives_clear_error(reg, monkeypatch):
    rid = reg.create_run("x", "h", "")
    monkeypatch.setattr(connect_mod, "WAIT_S", 0.3)
    child = _child(f"""
        import duckdb, time
        con = duckdb.connect({str(reg.path)!r}); print("held", flush=True); time.sleep(3)
    """)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(RegistryError, match="stayed locked"):
            reg.get_run(rid)
    finally:
        child.kill()
        child.wait()


def test_not_a_registry_file(tmp_path):
    bad = tmp_path / "bad.duckdb"
    bad.write_text("not a database")
    with pytest.raises(RegistryError, match="Cannot open the registry"):
        Registry(bad).list_runs()
