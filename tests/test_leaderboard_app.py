"""Leaderboard: the table logic (averages, staleness, best) and every view through Streamlit's AppTest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from koe5.registry import Registry
from koe5.registry.board import leaderboard, load_metrics, load_runs, stale_mask
from koe5.registry.demo import make_demo_registry

APP = str(Path(__file__).resolve().parents[1] / "dashboards" / "leaderboard.py")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = tmp_path_factory.mktemp("board") / "reg.duckdb"
    return path, make_demo_registry(path)


@pytest.fixture
def app(demo, monkeypatch) -> AppTest:
    monkeypatch.setenv("KOE5_REGISTRY", str(demo[0]))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def _value(reg: Registry, run_id: str, bench: str, metric: str, k: int) -> float:
    return next(m["value"] for m in reg.get_run(run_id)["metrics"]
                if (m["benchmark"], m["metric"], m["k"]) == (bench, metric, k))


def test_table_values_averages_and_staleness(demo):
    path, ids = demo
    reg = Registry(path)
    table, stale = leaderboard(load_runs(reg), load_metrics(reg))
    row = table.set_index("run_id").loc[ids["trained"]]
    for bench in ("ko-strategyqa", "autorag-ko"):
        assert row[f"{bench} F1@3"] == pytest.approx(round(100 * _value(reg, ids["trained"], bench, "f1", 3), 2))
    mean = np.mean([100 * _value(reg, ids["trained"], b, "ndcg", 1) for b in ("ko-strategyqa", "autorag-ko")])
    assert row["Avg NDCG@1"] == pytest.approx(round(mean, 2))
    # The run evaluated on another benchmark version: marked stale and never averaged.
    srow = table.index[table["run_id"] == ids["stale"]][0]
    assert stale.loc[srow, "ko-strategyqa NDCG@1"] and pd.isna(table.loc[srow, "Avg NDCG@1"])
    assert not stale.drop(index=srow).drop(columns=["run_id"]).to_numpy().any()
    avgs = table["Avg NDCG@1"].dropna().tolist()
    assert avgs == sorted(avgs, reverse=True)  # best first


def test_benchmark_subset_and_missing_values(demo):
    path, ids = demo
    reg = Registry(path)
    runs, metrics = load_runs(reg), load_metrics(reg)
    table, _ = leaderboard(runs, metrics, ["autorag-ko"])
    assert not any(c.startswith("ko-strategyqa") for c in table.columns)
    row = table.set_index("run_id").loc[ids["baseline"]]
    assert row["Avg F1@1"] == row["autorag-ko F1@1"]
    # A run lacking one benchmark gets no average rather than a mean over fewer benchmarks.
    partial = metrics[~((metrics["run_id"] == ids["trained"]) & (metrics["benchmark"] == "autorag-ko"))]
    table, _ = leaderboard(runs, partial)
    assert pd.isna(table.set_index("run_id").loc[ids["trained"], "Avg NDCG@3"])


def test_stale_mask_majority_per_benchmark():
    rng = np.random.default_rng(0)
    rows = []
    for r in range(9):
        for b in ("b1", "b2"):
            fp = "old" if (b == "b1" and r < 3) else "new"
            for metric in ("ndcg", "f1"):
                rows.append({"run_id": f"r{r}", "benchmark": b, "metric": metric, "k": 1, "value": rng.random(),
                             "fingerprint": fp, "evaluator_version": "2" if r == 8 and b == "b2" else "1"})
    m = pd.DataFrame(rows)
    got = stale_mask(m)
    expected = ((m["benchmark"] == "b1") & (m["run_id"].isin(["r0", "r1", "r2"]))) | \
               ((m["benchmark"] == "b2") & (m["run_id"] == "r8"))
    assert got.tolist() == expected.tolist()


def test_leaderboard_view(app, demo):
    path, ids = demo
    df = app.dataframe[0].value
    assert {ids["baseline"], ids["trained"]} <= set(df["run_id"])
    assert set(df["kind"]) >= {"baseline", "train"}  # baselines and fine-tuned runs side by side
    assert "Avg NDCG@1" in df.columns and "ko-strategyqa F1@3" in df.columns
    assert df.set_index("run_id").loc[ids["stale"], "stale"].startswith("†")
    assert any("Best by Avg NDCG@1" in m.value for m in app.markdown)


def test_leaderboard_filters(app, demo):
    path, ids = demo
    kind = next(w for w in app.sidebar.multiselect if w.label == "Kind")
    kind.set_value(["baseline"]).run()
    assert app.dataframe[0].value["run_id"].tolist() == [ids["baseline"]]
    kind.set_value([]).run()
    next(w for w in app.sidebar.multiselect if w.label == "Tag").set_value(["sweep"]).run()
    assert len(app.dataframe[0].value) == 3
    next(w for w in app.sidebar.multiselect if w.label == "Tag").set_value([]).run()
    next(w for w in app.sidebar.multiselect if w.label == "Benchmarks").set_value(["autorag-ko"]).run()
    cols = app.dataframe[0].value.columns
    assert "autorag-ko NDCG@1" in cols and not any(c.startswith("ko-strategyqa") for c in cols)
    next(w for w in app.sidebar.multiselect if w.label == "Status").set_value(["finished"]).run()
    assert len(app.dataframe[0].value) == 6
    next(w for w in app.sidebar.multiselect if w.label == "Tag").set_value(["sweep"]).run()
    next(w for w in app.sidebar.multiselect if w.label == "Kind").set_value(["baseline"]).run()
    assert not app.exception and any("No runs match" in i.value for i in app.info)


def test_sweep_view(app, demo):
    path, ids = demo
    app.sidebar.radio[0].set_value("Sweeps").run()
    assert not app.exception
    points = app.dataframe[0].value
    assert points["train.batch_size"].tolist() == [16, 32, 64]
    reg = Registry(path)
    expected = [100 * np.mean([_value(reg, ids[f"sweep{bs}"], b, "ndcg", 1) for b in ("ko-strategyqa", "autorag-ko")])
                for bs in (16, 32, 64)]
    assert points["NDCG@1"].tolist() == pytest.approx(expected)  # NDCG@1 against batch size, mean of benchmarks
    next(w for w in app.main.selectbox if w.label == "Metric").set_value("F1@3").run()
    next(w for w in app.main.selectbox if w.label == "Benchmark").set_value("autorag-ko").run()
    got = app.dataframe[0].value
    assert got["F1@3"].tolist() == pytest.approx([100 * _value(reg, ids[f"sweep{bs}"], "autorag-ko", "f1", 3)
                                                  for bs in (16, 32, 64)])
    assert app.get("vega_lite_chart") or app.get("arrow_vega_lite_chart")


def test_training_curves_view(app, demo):
    path, ids = demo
    app.sidebar.radio[0].set_value("Training curves").run()
    assert not app.exception
    assert app.multiselect[0].value == [f"e5-small-ko-ft ({ids['trained']})"]
    charts = app.get("vega_lite_chart") or app.get("arrow_vega_lite_chart")
    assert len(charts) == 4  # loss, lr, throughput, margin
    assert [m.value for m in app.markdown if m.value.startswith("**")] == [
        "**loss**", "**lr**", "**triples_per_s**", "**margin**"]


def test_run_view(app, demo):
    path, ids = demo
    app.sidebar.radio[0].set_value("Run").run()
    label = f"e5-small-ko-ft ({ids['trained']})"
    app.selectbox(key="run_page").set_value(label).run()
    assert not app.exception
    assert "name: e5-small-ko-ft" in app.code[0].value
    app.selectbox(key="diff_against").set_value(f"e5-small-baseline ({ids['baseline']})").run()
    diff = app.dataframe[0].value
    assert set(diff["key"]) == {"name", "train.lr"}
    app.selectbox(key="miss_benchmark").set_value("autorag-ko").run()
    app.selectbox(key="miss_metric").set_value("f1@1").run()
    assert app.selectbox(key="miss_metric").options == ["ndcg@3", "f1@1"]  # not ranks or flags
    misses = next(d.value for d in app.dataframe if "qid" in d.value.columns)
    artifacts = Registry(path).get_run(ids["trained"])["artifacts"]
    per_query = pd.concat([pd.read_json(a["path"], lines=True) for a in artifacts if a["kind"] == "per_query"])
    per_query = per_query[per_query["benchmark"] == "autorag-ko"]
    assert sorted(misses["qid"]) == sorted(per_query.loc[per_query["f1@1"] == 0, "qid"])
    assert "q-none" not in set(misses["qid"])  # excluded queries are not misses


def test_empty_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("KOE5_REGISTRY", str(tmp_path / "none.duckdb"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception and any("No runs" in i.value for i in at.info)
