"""`koe5 ls/show/compare/diff/best/export/sql/rm` through koe5.cli.main."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from koe5.cli import main
from koe5.registry import Registry
from koe5.spec.diff import ABSENT, diff_yaml, flatten
from koe5.registry.demo import make_demo_registry


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "reg.duckdb"
    return path, make_demo_registry(path)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def cli_json(capsys, *argv):
    rc, out, err = run_cli(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def test_ls_json_matches_registry(demo, capsys):
    path, ids = demo
    runs = cli_json(capsys, "ls", "--registry", str(path))
    assert {r["run_id"] for r in runs} == {v for k, v in ids.items() if k != "sweep"}
    by_id = {r["run_id"]: r for r in runs}
    metrics = Registry(path).get_run(ids["trained"])["metrics"]
    ndcg10 = {m["benchmark"]: m["value"] for m in metrics if (m["metric"], m["k"]) == ("ndcg", 10)}
    assert by_id[ids["trained"]]["headline"] == pytest.approx(ndcg10)
    assert by_id[ids["trained"]]["status"] == "finished"


def test_ls_filters_and_sort(demo, capsys):
    path, ids = demo
    r = str(path)
    assert [x["run_id"] for x in cli_json(capsys, "ls", "--registry", r, "--tag", "baseline")] == [ids["baseline"]]
    assert len(cli_json(capsys, "ls", "--registry", r, "--sweep", ids["sweep"])) == 3
    assert {x["name"] for x in cli_json(capsys, "ls", "--registry", r, "--name", "bs-*")} == {
        "bs-sweep-16", "bs-sweep-32", "bs-sweep-64"}
    ranked = cli_json(capsys, "ls", "--registry", r, "--sort", "f1@3")
    means = [x["headline_mean"] for x in ranked]
    assert means == sorted(means, reverse=True) and ranked[0]["headline_metric"] == "f1@3"
    rc, out, err = run_cli(capsys, "ls", "--registry", r, "--sort", "ndcg@x")
    assert rc == 2 and "NAME@K" in err and "Traceback" not in err
    rc, out, _ = run_cli(capsys, "ls", "--registry", r)
    assert rc == 0 and "e5-small-ko-ft" in out


def test_tables_print_metrics_x100_and_say_so(demo, capsys):
    """One scale everywhere a person reads: x100, as koe5-run, koe5 eval and the leaderboard print; --json
    keeps the registry's fractions."""
    path, ids = demo
    r = str(path)
    mean = next(x for x in cli_json(capsys, "ls", "--registry", r) if x["run_id"] == ids["trained"])["headline_mean"]
    rc, out, _ = run_cli(capsys, "ls", "--registry", r)
    assert "ndcg@10 mean (x100)" in out.splitlines()[0]
    assert f"{100 * mean:.2f}" in next(line for line in out.splitlines() if line.startswith(ids["trained"]))
    rc, out, _ = run_cli(capsys, "compare", ids["baseline"], ids["trained"], "--registry", r)
    assert "metric (x100)" in out.splitlines()[0]
    value = next(m["value"] for m in Registry(path).get_run(ids["trained"])["metrics"]
                 if (m["metric"], m["k"]) == ("ndcg", 10))
    assert f"{100 * value:.2f}" in out
    rc, out, _ = run_cli(capsys, "show", ids["trained"], "--registry", r)
    assert "value (x100)" in out and out.index("metrics:") < out.index("spec:")


def test_show(demo, capsys):
    path, ids = demo
    run = cli_json(capsys, "show", ids["trained"][:18], "--registry", str(path))
    assert run["run_id"] == ids["trained"] and run["data_mix"] == {"ko_sample": 1.0}
    assert run["git_commit"] == "0123abc" and run["artifacts"][0]["kind"] == "per_query"
    assert yaml.safe_load(run["spec_yaml"])["name"] == "e5-small-ko-ft"
    rc, out, _ = run_cli(capsys, "show", ids["trained"], "--registry", str(path))
    assert rc == 0 and "0123abc" in out and "per_query" in out


def test_unknown_or_ambiguous_prefix(demo, capsys):
    path, ids = demo
    rc, _, err = run_cli(capsys, "show", "1999", "--registry", str(path))
    assert rc == 2 and "No run id starts or ends with" in err
    rc, _, err = run_cli(capsys, "show", "20", "--registry", str(path))
    assert rc == 2 and "ambiguous" in err


def test_show_by_name_suffix_and_latest(demo, capsys):
    path, ids = demo
    run = cli_json(capsys, "show", "e5-small-ko-ft", "--registry", str(path))
    assert run["run_id"] == ids["trained"]
    assert cli_json(capsys, "show", ids["trained"][-6:], "--registry", str(path))["run_id"] == ids["trained"]
    # `ls` lists newest first, by creation time (ids made within one second do not sort by time).
    newest_train = next(r["run_id"] for r in cli_json(capsys, "ls", "--registry", str(path)) if r["kind"] == "train")
    assert cli_json(capsys, "show", "latest", "--registry", str(path))["run_id"] == newest_train


def test_compare_deltas_and_per_query(demo, capsys, tmp_path):
    path, ids = demo
    reg = Registry(path)
    out = cli_json(capsys, "compare", ids["baseline"], ids["trained"], "--registry", str(path))
    base = {(m["benchmark"], f"{m['metric']}@{m['k']}"): m["value"] for m in reg.get_run(ids["baseline"])["metrics"]}
    ft = {(m["benchmark"], f"{m['metric']}@{m['k']}"): m["value"] for m in reg.get_run(ids["trained"])["metrics"]}
    assert len(out["metrics"]) == len(base)
    for row in out["metrics"]:
        key = (row["benchmark"], row["metric"])
        assert row["values"] == pytest.approx([base[key], ft[key]])
        assert row["deltas"][0] == pytest.approx(ft[key] - base[key])
    assert out["per_query_vs_first"][ids["trained"]] is None  # the baseline saved no per-query file


def test_per_query_wins_against_hand_count(tmp_path, capsys):
    reg = Registry(tmp_path / "r.duckdb")
    a, b = reg.create_run("a", "h", ""), reg.create_run("b", "h", "")
    rng = np.random.default_rng(0)
    frames = {}
    for run, name in ((a, "a"), (b, "b")):
        for bench in ("b1", "b2"):  # one file per benchmark, same qids in both: matched per benchmark
            df = pd.DataFrame({"benchmark": bench, "qid": [f"q{i}" for i in range(30)],
                               "first_relevant_rank": rng.integers(1, 5, 30), "excluded": False,
                               "ndcg@3": rng.integers(0, 5, 30) / 4})  # exact in JSON too
            df.loc[0, "ndcg@3"] = np.nan  # an excluded query
            frames[name, bench] = df
            shuffled = df.sample(frac=1, random_state=1)
            if name == "a":
                shuffled.to_parquet(tmp_path / f"{name}-{bench}.parquet")
                reg.add_artifact(run, "per_query", str(tmp_path / f"{name}-{bench}.parquet"))
            else:
                shuffled.to_json(tmp_path / f"{name}-{bench}.jsonl", orient="records", lines=True)
                reg.add_artifact(run, "per_query", str(tmp_path / f"{name}-{bench}.jsonl"))
    out = cli_json(capsys, "compare", a, b, "--registry", str(tmp_path / "r.duckdb"))
    assert set(out["per_query_vs_first"][b]) == {"ndcg@3"}  # ranks and flags are not metrics
    wins = losses = ties = 0
    for bench in ("b1", "b2"):
        va, vb = frames["a", bench]["ndcg@3"].to_numpy(), frames["b", bench]["ndcg@3"].to_numpy()
        wins, losses, ties = wins + (vb > va).sum(), losses + (vb < va).sum(), ties + (vb == va).sum()
    assert out["per_query_vs_first"][b]["ndcg@3"] == {"wins": wins, "losses": losses, "ties": ties}


def test_compare_orders_cutoffs_as_numbers_and_names_per_query_f1_as_the_table_does(tmp_path, capsys):
    reg = Registry(tmp_path / "r.duckdb")
    a, b = reg.create_run("a", "h", ""), reg.create_run("b", "h", "")
    for run in (a, b):
        reg.add_metrics(run, "bench", {(m, k): 0.5 for m in ("f1", "ndcg") for k in (1, 3, 10)})
        df = pd.DataFrame({"qid": ["q1", "q2"], "f1q@1": [0.0, 1.0], "f1q@10": [0.5, 0.5], "f1q@3": [0.2, 0.3]})
        df.to_parquet(tmp_path / f"{run}.parquet")
        reg.add_artifact(run, "per_query", str(tmp_path / f"{run}.parquet"))
    out = cli_json(capsys, "compare", a, b, "--registry", str(tmp_path / "r.duckdb"))
    assert [r["metric"] for r in out["metrics"]] == ["f1@1", "f1@3", "f1@10", "ndcg@1", "ndcg@3", "ndcg@10"]
    rc, text, _ = run_cli(capsys, "compare", a, b, "--registry", str(tmp_path / "r.duckdb"))
    lines = [line.strip() for line in text.splitlines()]
    assert [line.split(":")[0] for line in lines if "wins" in line] == [
        "f1@1 (per query)", "f1@3 (per query)", "f1@10 (per query)"]
    assert "f1q" not in text


def test_diff(demo, capsys):
    path, ids = demo
    out = cli_json(capsys, "diff", ids["sweep16"], ids["sweep64"], "--registry", str(path))
    assert {d["key"] for d in out} == {"name", "train.batch_size"}
    rc, out, _ = run_cli(capsys, "diff", ids["sweep16"], ids["sweep16"], "--registry", str(path))
    assert rc == 0 and "identical" in out


def test_spec_diff_paths():
    a = "a: {b: 1, c: [1, 2]}\nd: x\n"
    b = "a: {b: 2, c: [1, 3, 4]}\ne: null\n"
    assert diff_yaml(a, b) == [("a.b", 1, 2), ("a.c[1]", 2, 3), ("d", "x", ABSENT), ("a.c[2]", ABSENT, 4),
                               ("e", ABSENT, None)]
    assert flatten({"x": {}, "y": []}) == {"x": {}, "y": []}


def test_best(demo, capsys):
    path, ids = demo
    reg = Registry(path)
    _, rows = reg.query("SELECT run_id, benchmark, value FROM metrics WHERE metric = 'ndcg' AND k = 3")
    df = pd.DataFrame(rows, columns=["run_id", "benchmark", "value"])
    stale_best = df.groupby("run_id")["value"].mean().idxmax()
    assert stale_best == ids["stale"]  # the demo's stale run has the highest numbers ...
    df = df[df["run_id"] != ids["stale"]]  # ... but was scored on other benchmark versions: not comparable
    best = cli_json(capsys, "best", "--metric", "ndcg@3", "--registry", str(path))
    assert best["run_id"] == df.groupby("run_id")["value"].mean().idxmax()
    one = df[df["benchmark"] == "autorag-ko"]
    best = cli_json(capsys, "best", "--metric", "ndcg@3", "--benchmark", "autorag-ko", "--registry", str(path))
    assert best["run_id"] == one.loc[one["value"].idxmax(), "run_id"]
    assert best["value"] == pytest.approx(one["value"].max())
    rc, _, err = run_cli(capsys, "best", "--metric", "ndcg@3", "--benchmark", "nope", "--registry", str(path))
    assert rc == 2 and "No run has" in err


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_export(demo, capsys, tmp_path, fmt):
    path, ids = demo
    out = tmp_path / f"x.{fmt}"
    rc, _, err = run_cli(capsys, "export", "--format", fmt, "-o", str(out), "--registry", str(path))
    assert rc == 0, err
    df = {"csv": pd.read_csv, "parquet": pd.read_parquet, "json": pd.read_json}[fmt](out)
    n_metrics = Registry(path).query("SELECT count(*) FROM metrics")[1][0][0]
    assert len(df) == n_metrics and set(df["run_id"]) == {v for k, v in ids.items() if k != "sweep"}


@pytest.mark.parametrize("sql", [
    "DELETE FROM runs",
    "INSERT INTO runs (run_id) VALUES ('x')",
    "UPDATE runs SET status = 'failed'",
    "DROP TABLE metrics",
    "CREATE TABLE t (x INT)",
    "SELECT 1; DELETE FROM runs",
    "ATTACH '/tmp/koe5-other.duckdb' AS other",
    "COPY runs TO '/tmp/koe5-copy.csv'",
    "PRAGMA enable_profiling",
])
def test_sql_refuses_writes(demo, capsys, sql):
    path, _ = demo
    before = Registry(path).query("SELECT count(*), max(status) FROM runs")[1]
    rc, out, err = run_cli(capsys, "sql", sql, "--registry", str(path))
    assert rc == 2 and "Traceback" not in err and err.strip()
    assert Registry(path).query("SELECT count(*), max(status) FROM runs")[1] == before


def test_read_only_connection_is_the_backstop(demo):
    # Even a write statement that got past the up-front check is refused by DuckDB itself.
    path, _ = demo
    import duckdb
    with pytest.raises(duckdb.Error):
        Registry(path).query("DELETE FROM runs")


def test_sql_reads(demo, capsys):
    path, ids = demo
    rows = cli_json(capsys, "sql", "SELECT name FROM runs WHERE kind = 'baseline'", "--registry", str(path))
    assert rows == [{"name": "e5-small-baseline"}]
    rc, out, _ = run_cli(capsys, "sql", "SHOW TABLES", "--registry", str(path))
    assert rc == 0 and "train_log" in out
    rc, _, err = run_cli(capsys, "sql", "SELECT * FROM no_such_table", "--registry", str(path))
    assert rc == 2 and "no_such_table" in err.lower() and "Traceback" not in err


def test_rm_asks_first(tmp_path, capsys, monkeypatch):
    path = tmp_path / "r.duckdb"
    reg = Registry(path)
    rid = reg.create_run("x", "h", "")
    reg.add_metrics(rid, "b", {("ndcg", 1): 0.5})
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    rc, out, _ = run_cli(capsys, "rm", rid, "--registry", str(path))
    assert rc == 1 and reg.get_run(rid)
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    rc, out, _ = run_cli(capsys, "rm", rid[:18], "--registry", str(path))
    assert rc == 0 and reg.list_runs() == [] and reg.query("SELECT count(*) FROM metrics")[1] == [(0,)]
    rid = reg.create_run("y", "h", "")
    assert run_cli(capsys, "rm", rid, "--yes", "--registry", str(path))[0] == 0 and reg.list_runs() == []


def test_env_registry_and_empty(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KOE5_REGISTRY", str(tmp_path / "empty.duckdb"))
    assert cli_json(capsys, "ls") == []
    rc, out, _ = run_cli(capsys, "ls")
    assert rc == 0 and "no runs" in out


def test_ls_into_a_reader_that_stops_early_exits_cleanly(tmp_path):
    """`koe5 ls | head`: the reader closes the pipe after a line. Enough runs that the listing overflows the
    pipe's buffer, so koe5 really meets the closed pipe; it must not print a BrokenPipe error."""
    import subprocess
    import sys

    import duckdb

    path = tmp_path / "many.duckdb"
    make_demo_registry(path)
    con = duckdb.connect(str(path))
    con.execute("INSERT INTO runs SELECT r.* REPLACE (r.run_id || '-' || CAST(t.i AS VARCHAR) AS run_id) "
                "FROM runs AS r, range(400) AS t(i)")
    con.close()
    proc = subprocess.Popen([sys.executable, "-m", "koe5.cli", "ls", "--registry", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"run_id")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and "Broken pipe" not in err and "Traceback" not in err, err
