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


def open_app(registry, monkeypatch) -> AppTest:
    """The board on `registry`, rendered once without an exception."""
    monkeypatch.setenv("KOE5_REGISTRY", str(registry))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


@pytest.fixture
def app(demo, monkeypatch) -> AppTest:
    return open_app(demo[0], monkeypatch)


def _value(reg: Registry, run_id: str, bench: str, metric: str, k: int) -> float:
    return next(m["value"] for m in reg.get_run(run_id)["metrics"]
                if (m["benchmark"], m["metric"], m["k"]) == (bench, metric, k))


def test_table_values_averages_and_staleness(demo):
    path, ids = demo
    reg = Registry(path)
    table, stale = leaderboard(load_runs(reg), load_metrics(reg))
    row = table.set_index("run_id").loc[ids["trained"]]
    for bench in ("ko-strategyqa", "autorag-ko"):
        assert row[f"{bench} F1@3 (x100)"] == pytest.approx(round(100 * _value(reg, ids["trained"], bench, "f1", 3), 2))
    mean = np.mean([100 * _value(reg, ids["trained"], b, "ndcg", 1) for b in ("ko-strategyqa", "autorag-ko")])
    assert row["Avg NDCG@1 (x100)"] == pytest.approx(round(mean, 2))
    # The run evaluated on another benchmark version: marked stale and never averaged.
    srow = table.index[table["run_id"] == ids["stale"]][0]
    assert stale.loc[srow, "ko-strategyqa NDCG@1 (x100)"] and pd.isna(table.loc[srow, "Avg NDCG@1 (x100)"])
    assert not stale.drop(index=srow).drop(columns=["run_id"]).to_numpy().any()
    avgs = table["Avg NDCG@1 (x100)"].dropna().tolist()
    assert avgs == sorted(avgs, reverse=True)  # best first


def test_benchmark_subset_and_missing_values(demo):
    path, ids = demo
    reg = Registry(path)
    runs, metrics = load_runs(reg), load_metrics(reg)
    table, _ = leaderboard(runs, metrics, ["autorag-ko"])
    assert not any(c.startswith("ko-strategyqa") for c in table.columns)
    row = table.set_index("run_id").loc[ids["baseline"]]
    assert row["Avg F1@1 (x100)"] == row["autorag-ko F1@1 (x100)"]
    # A run lacking one benchmark gets no average rather than a mean over fewer benchmarks.
    partial = metrics[~((metrics["run_id"] == ids["trained"]) & (metrics["benchmark"] == "autorag-ko"))]
    table, _ = leaderboard(runs, partial)
    assert pd.isna(table.set_index("run_id").loc[ids["trained"], "Avg NDCG@3 (x100)"])


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
    assert "Avg NDCG@1 (x100)" in df.columns and "ko-strategyqa F1@3 (x100)" in df.columns
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
    assert "autorag-ko NDCG@1 (x100)" in cols and not any(c.startswith("ko-strategyqa") for c in cols)
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
    assert points["NDCG@1 (x100)"].tolist() == pytest.approx(expected)  # NDCG@1 against batch size, mean of benchmarks
    next(w for w in app.main.selectbox if w.label == "Metric").set_value("F1@3").run()
    next(w for w in app.main.selectbox if w.label == "Benchmark").set_value("autorag-ko").run()
    got = app.dataframe[0].value
    assert got["F1@3 (x100)"].tolist() == pytest.approx([100 * _value(reg, ids[f"sweep{bs}"], "autorag-ko", "f1", 3)
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
    diff = next(d.value for d in app.dataframe if "key" in d.value.columns)
    assert set(diff["key"]) == {"name", "train.lr"}
    app.selectbox(key="miss_benchmark").set_value("autorag-ko").run()
    app.selectbox(key="miss_metric").set_value("f1@1").run()
    assert app.selectbox(key="miss_metric").options == ["ndcg@3", "f1@1"]  # not ranks or flags
    misses = next(d.value for d in app.dataframe if "qid" in d.value.columns)
    artifacts = Registry(path).get_run(ids["trained"])["artifacts"]
    per_query = pd.concat([pd.read_json(a["path"], lines=True) for a in artifacts if a["kind"] == "per_query"])
    per_query = per_query[per_query["benchmark"] == "autorag-ko"]
    assert sorted(misses["qid"]) == sorted(per_query.loc[per_query["f1@1"] == 0, "qid"])
    assert misses["ndcg@3 (x100)"].isin([0, 100]).all()  # per-query metrics x100 too
    assert "q-none" not in set(misses["qid"])  # excluded queries are not misses


def test_empty_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("KOE5_REGISTRY", str(tmp_path / "none.duckdb"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception and any("No runs" in i.value for i in at.info)


# --- User-reported problems (one test each). They use a second registry: the demo plus the runs each
# problem needs, so the counts the tests above check stay as they are.

def _chart_layers(chart) -> list[tuple[str, pd.DataFrame]]:
    """(mark type, data) of every layer of a rendered Vega-Lite chart, decoded from the element's proto."""
    import json

    from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df

    proto = chart.proto
    datasets = {d.name: convert_arrow_bytes_to_pandas_df(d.data.data) for d in proto.datasets}
    spec = json.loads(proto.spec)
    layers = []
    for layer in spec.get("layer", [spec]):
        mark = layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"]
        name = layer.get("data", spec.get("data", {})).get("name")
        data = datasets[name] if name in datasets else convert_arrow_bytes_to_pandas_df(proto.data.data)
        layers.append((mark, data))
    return layers


def _charts(at: AppTest) -> list:
    return at.get("vega_lite_chart") or at.get("arrow_vega_lite_chart")


def _in_order(node):
    """Every element and block under `node`, in the order the page shows them."""
    for key in sorted(getattr(node, "children", {}) or {}):
        child = node.children[key]
        yield child
        yield from _in_order(child)


def _write_log(reg: Registry, run_id: str, path: Path, steps: list[int]) -> None:
    import json

    path.write_text("".join(json.dumps({"step": s, "loss": 3.0 / s, "lr": 1e-5, "triples_per_s": 50.0 + s,
                                        "margin": 0.05 * s}) + "\n" for s in steps))
    reg.fold_train_log(run_id, path)


@pytest.fixture(scope="module")
def richer(tmp_path_factory):
    from koe5.registry.demo import spec_yaml

    path = tmp_path_factory.mktemp("board_richer") / "reg.duckdb"
    ids = make_demo_registry(path)
    reg = Registry(path)
    # The sweep's own baseline: the untrained model, recorded with the sweep's id (as koe5-run does).
    # Its spec has the swept key too, so a sweep plot that takes every run of the sweep plots it as a point.
    ids["sweep_base"] = reg.create_run("bs-sweep@init", "hash-bs-init", spec_yaml("bs-sweep@init", batch_size=32),
                                       kind="baseline", status="running", tags=["init"], sweep_id=ids["sweep"])
    reg.add_metrics(ids["sweep_base"], "ko-strategyqa", {("ndcg", 1): 0.30, ("f1", 3): 0.20},
                    fingerprint="ko-strategyqa-fp-v1", evaluator_version="1")
    reg.add_metrics(ids["sweep_base"], "autorag-ko", {("ndcg", 1): 0.40, ("f1", 3): 0.25},
                    fingerprint="autorag-ko-fp-v1", evaluator_version="1")
    reg.set_status(ids["sweep_base"], "finished")
    # Training logs: one run logged every 4 steps, one shorter than its log_every (a single row).
    ids["log4"] = reg.create_run("log-every-4", "hash-log4", spec_yaml("log-every-4"), status="running")
    _write_log(reg, ids["log4"], path.parent / "log4.jsonl", [4, 8, 12])
    reg.set_status(ids["log4"], "finished")
    ids["short"] = reg.create_run("short-run", "hash-short", spec_yaml("short-run"), status="running")
    _write_log(reg, ids["short"], path.parent / "short.jsonl", [3])
    reg.set_status(ids["short"], "finished")
    return path, ids


@pytest.fixture
def richer_app(richer, monkeypatch) -> AppTest:
    return open_app(richer[0], monkeypatch)


def test_sweep_plot_shows_baseline_as_reference_line(richer_app, richer):
    """Problem 1: an untrained baseline of the sweep is a horizontal rule, not a point of the sweep line."""
    path, ids = richer
    app = richer_app
    app.sidebar.radio[0].set_value("Sweeps").run()
    assert not app.exception
    points = app.dataframe[0].value
    assert points["train.batch_size"].tolist() == [16, 32, 64]  # the three trained runs only
    assert ids["sweep_base"] not in set(points["run_id"])
    layers = _chart_layers(_charts(app)[0])
    lines = [d for mark, d in layers if mark in ("line", "bar")]
    rules = [d for mark, d in layers if mark == "rule"]
    assert len(lines) == 1 and len(lines[0]) == 3, layers
    assert len(rules) == 1 and len(rules[0]) == 1, layers
    # The rule sits at the baseline's NDCG@1, mean of the two benchmarks, x100.
    assert rules[0].select_dtypes("number").iloc[0].tolist() == [pytest.approx(35.0)]
    assert "NDCG@1 (x100)" in points.columns


def test_metric_picker_defaults_include_ndcg10(app, demo):
    """Problem 2: a metric picker over every recorded metric@k; the defaults are the four KoE5 columns
    plus NDCG@10 (MTEB's main retrieval score); every value is x100 and its header says so."""
    path, ids = demo
    pickers = [w for w in app.multiselect if w.label == "Metrics"]
    assert len(pickers) == 1, [w.label for w in app.multiselect]
    picker = pickers[0]
    assert picker.value == ["NDCG@1", "F1@1", "NDCG@3", "F1@3", "NDCG@10"]
    assert {"Recall@10", "MRR@10", "MAP@10", "Precision@5"} <= set(picker.options)
    df = app.dataframe[0].value
    assert "Avg NDCG@10 (x100)" in df.columns and "ko-strategyqa NDCG@10 (x100)" in df.columns
    picker.set_value(["MRR@10", "Recall@10"]).run()
    df = app.dataframe[0].value.set_index("run_id")
    metric_cols = [c for c in df.columns if c.endswith("(x100)")]
    assert metric_cols and all("MRR@10" in c or "Recall@10" in c for c in metric_cols)
    reg = Registry(path)
    assert df.loc[ids["trained"], "autorag-ko MRR@10 (x100)"] == pytest.approx(
        round(100 * _value(reg, ids["trained"], "autorag-ko", "mrr", 10), 2))
    assert any("Best by Avg MRR@10 (x100)" in m.value for m in app.markdown)


def test_spec_columns_and_change_against_base_model(app, demo):
    """Problem 3: chosen spec keys as columns, and each run's change against the baseline run of the
    same model on the same benchmark (same fingerprint) as delta columns."""
    path, ids = demo
    pickers = [w for w in app.multiselect if w.label == "Spec columns"]
    assert len(pickers) == 1, [w.label for w in app.multiselect]
    assert {"train.lr", "train.batch_size", "model.name_or_path"} <= set(pickers[0].options)
    pickers[0].set_value(["train.lr", "train.batch_size"]).run()
    df = app.dataframe[0].value.set_index("run_id")
    assert df.loc[ids["trained"], "train.lr"] == pytest.approx(3e-5)
    assert df.loc[ids["sweep16"], "train.batch_size"] == 16
    # Change against the base model: trained - baseline, on the averages by default.
    delta = "Δ Avg NDCG@1 (x100)"
    assert delta in df.columns
    assert df.loc[ids["trained"], delta] == pytest.approx(
        df.loc[ids["trained"], "Avg NDCG@1 (x100)"] - df.loc[ids["baseline"], "Avg NDCG@1 (x100)"], abs=0.011)
    assert pd.isna(df.loc[ids["baseline"], delta])  # a baseline is not compared with itself
    assert pd.isna(df.loc[ids["stale"], delta])  # another benchmark version: no comparable baseline
    # Per-benchmark deltas on request.
    next(w for w in app.selectbox if w.label == "Change against the base model").set_value("every column").run()
    df = app.dataframe[0].value.set_index("run_id")
    reg = Registry(path)
    expected = 100 * (_value(reg, ids["trained"], "autorag-ko", "f1", 3)
                      - _value(reg, ids["baseline"], "autorag-ko", "f1", 3))
    assert df.loc[ids["trained"], "Δ autorag-ko F1@3 (x100)"] == pytest.approx(expected, abs=0.006)


def test_run_view_metrics_before_spec(app, demo):
    """Problem 4: the run page shows the metrics (x100) first and the long spec after, folded away."""
    path, ids = demo
    app.sidebar.radio[0].set_value("Run").run()
    app.selectbox(key="run_page").set_value(f"e5-small-ko-ft ({ids['trained']})").run()
    assert not app.exception
    order = list(_in_order(app.main))
    metrics_at = next(i for i, e in enumerate(order) if getattr(e, "type", None) == "dataframe"
                      and {"benchmark", "metric"} <= set(e.value.columns))
    spec_at = next(i for i, e in enumerate(order) if getattr(e, "type", None) == "code"
                   and "name: e5-small-ko-ft" in e.value)
    assert metrics_at < spec_at
    assert any("name: e5-small-ko-ft" in c.value for e in app.expander for c in e.code)  # in an expander
    table = order[metrics_at].value
    reg = Registry(path)
    row = table[(table["benchmark"] == "autorag-ko") & (table["metric"] == "NDCG@10")]
    assert row["value (x100)"].tolist() == pytest.approx([100 * _value(reg, ids["trained"], "autorag-ko", "ndcg", 10)],
                                                      abs=0.006)  # two decimals


def test_training_curves_every_logged_row(richer_app, richer):
    """Problem 5: every logged row is drawn, the first included, whatever steps other runs logged; a run
    with fewer than 2 rows gets a message instead of an empty chart."""
    path, ids = richer
    app = richer_app
    app.sidebar.radio[0].set_value("Training curves").run()
    labels = {role: f"{name} ({ids[role]})" for role, name in
              (("trained", "e5-small-ko-ft"), ("log4", "log-every-4"), ("short", "short-run"))}
    runs = next(w for w in app.multiselect if w.label == "Runs")
    runs.set_value(list(labels.values())).run()
    assert not app.exception
    charts = _charts(app)
    assert len(charts) == 4  # loss, lr, throughput, margin
    for chart in charts:
        (mark, data), = [(m, d) for m, d in _chart_layers(chart) if m == "line"]
        assert not data.isna().any().any(), data  # a missing value breaks the line: runs must not share rows
    (_, loss), = [(m, d) for m, d in _chart_layers(charts[0]) if m == "line"]
    steps = {run: sorted(g["step"]) for run, g in loss.groupby(loss.columns[loss.columns.str.contains("run")][0])}
    assert steps[labels["log4"]] == [4, 8, 12]  # from the first logged row
    assert steps[labels["trained"]] == list(range(1, 21))
    assert labels["short"] not in steps
    assert any("short-run" in i.value and "fewer than 2" in i.value for i in app.info)


# --- Size and cost, query texts, wins and losses, averages first. A third registry: the demo plus an exported
# model directory, a baseline of a local model directory, devices, and a small benchmark on disk whose
# queries and passages the run page can show.

def _model_dir(path: Path, hidden: int, rows: int) -> Path:
    """A model directory as koe5's export writes it, as far as the leaderboard reads it: config.json and
    weights in safetensors (shapes [rows, hidden] and [hidden]: rows * hidden + hidden parameters)."""
    import json

    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": hidden}))
    save_file({"embeddings.weight": np.zeros((rows, hidden), dtype=np.float32),
               "pooler.bias": np.zeros(hidden, dtype=np.float32)}, str(path / "model.safetensors"))
    return path


def _mini_bench(path: Path) -> Path:
    """A BEIR folder: query q{i} ("질문 i") has passage d{i} ("문서 i") as its one relevant passage."""
    import json

    (path / "qrels").mkdir(parents=True)
    (path / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": f"문서 {i} 본문"},
                                                          ensure_ascii=False) + "\n" for i in range(12)))
    (path / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"질문 {i} 내용"},
                                                           ensure_ascii=False) + "\n" for i in range(12)))
    (path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                             + "".join(f"q{i}\td{i}\t1\n" for i in range(12)))
    return path


@pytest.fixture(scope="module")
def costed(tmp_path_factory):
    import json

    import yaml

    from koe5.eval.benchmark import load_benchmark
    from koe5.registry.demo import spec_yaml

    root = tmp_path_factory.mktemp("board_costed")
    path = root / "reg.duckdb"
    ids = make_demo_registry(path)
    reg = Registry(path)
    # The trained run exported its model (384-dim, 1000 x 384 + 384 parameters).
    reg.add_artifact(ids["trained"], "model", str(_model_dir(root / "ft-model", 384, 1000)))
    # A baseline of a local model directory: its size is known from the directory its spec names.
    local = _model_dir(root / "local-model", 256, 500)
    ids["local_base"] = reg.create_run("local-baseline", "hash-local", spec_yaml("local-baseline", model=str(local)),
                                       kind="baseline", status="running",
                                       provenance={"devices": ["NVIDIA H100 80GB HBM3"] * 2, "world_size": 2})
    reg.add_metrics(ids["local_base"], "ko-strategyqa", {("ndcg", 1): 0.30}, fingerprint="ko-strategyqa-fp-v1",
                    evaluator_version="1")
    reg.add_metrics(ids["local_base"], "autorag-ko", {("ndcg", 1): 0.40}, fingerprint="autorag-ko-fp-v1",
                    evaluator_version="1")
    reg.set_status(ids["local_base"], "finished")

    # Two runs evaluated on a benchmark on disk, with per-query results: A hits the odd queries at rank 1
    # (f1@1), B the first six.
    bench_dir = _mini_bench(root / "mini-bench")
    fp = load_benchmark(str(bench_dir), "mini").fingerprint
    for role, hit in (("text_a", lambda i: i % 2 == 1), ("text_b", lambda i: i < 6)):
        spec = yaml.safe_dump({"name": f"mini-{role}", "model": {"name_or_path": "intfloat/multilingual-e5-small"},
                               "eval": {"benchmarks": [{"name": "mini", "path": str(bench_dir)}]}})
        ids[role] = reg.create_run(f"mini-{role}", f"hash-{role}", spec, status="running")
        per_query = root / f"{role}.per_query-mini.jsonl"
        # B's file is of the current kind: it records the passage ranked first (for a miss, the next one's).
        first = {"top_document": lambda i: f"d{i}" if hit(i) else f"d{(i + 1) % 12}"} if role == "text_b" else {}
        per_query.write_text("".join(json.dumps({"benchmark": "mini", "fingerprint": fp, "qid": f"q{i}",
                                                 "excluded": False, "first_relevant_rank": 1 if hit(i) else 2 + i,
                                                 **{k: f(i) for k, f in first.items()},
                                                 "f1@1": float(hit(i)), "ndcg@3": float(hit(i) or i % 3 == 1)})
                                     + "\n" for i in range(12)))
        reg.add_artifact(ids[role], "per_query", str(per_query))
        reg.add_metrics(ids[role], "mini", {("ndcg", 1): 0.5}, fingerprint=fp, evaluator_version="1")
        reg.set_status(ids[role], "finished")
    return path, ids


@pytest.fixture
def costed_app(costed, monkeypatch) -> AppTest:
    return open_app(costed[0], monkeypatch)


def test_size_and_cost_columns_and_plots(costed_app, costed):
    """Problem 6: parameters, embedding dimension, training time and device per run where the registry
    knows them (blank otherwise), and quality against size and against training time, as MTEB plots."""
    path, ids = costed
    app = costed_app
    # The two benchmarks every demo run has (the mini benchmark's runs have no others, so no averages).
    next(w for w in app.sidebar.multiselect if w.label == "Benchmarks").set_value(["ko-strategyqa", "autorag-ko"]).run()
    df = app.dataframe[0].value.set_index("run_id")
    size, dim, time_col, device = "params (M)", "embedding dim", "train time (min)", "device"
    assert {size, dim, time_col, device} <= set(df.columns), list(df.columns)
    # From the exported model: 1000 x 384 + 384 parameters, hidden_size 384; from its train log: 20 s.
    assert df.loc[ids["trained"], size] == pytest.approx(0.38)
    assert df.loc[ids["trained"], dim] == 384
    assert df.loc[ids["trained"], time_col] == pytest.approx(20 / 60, abs=0.01)
    assert df.loc[ids["trained"], device] == "cpu"
    # A baseline of a local model directory: its size from there; no training; two identical GPUs.
    assert df.loc[ids["local_base"], size] == pytest.approx(0.13)
    assert df.loc[ids["local_base"], dim] == 256
    assert pd.isna(df.loc[ids["local_base"], time_col])
    assert df.loc[ids["local_base"], device] == "2× NVIDIA H100 80GB HBM3"
    # Unknown: blank, never made up.
    for col in (size, dim, time_col):
        assert pd.isna(df.loc[ids["sweep16"], col])
    assert not df.loc[ids["sweep16"], device]
    charts = {c.proto.spec: c for c in _charts(app)}
    by_size = [c for s, c in charts.items() if "params (M)" in s]
    by_time = [c for s, c in charts.items() if "train time (min)" in s]
    assert len(by_size) == 1 and len(by_time) == 1, list(charts)
    (_, size_data), = [(m, d) for m, d in _chart_layers(by_size[0]) if m in ("point", "circle")]
    assert sorted(size_data.select_dtypes("number").round(2).itertuples(index=False, name=None)) == sorted([
        (0.38, df.loc[ids["trained"], "Avg NDCG@1 (x100)"]), (0.13, 35.0)])
    (_, time_data), = [(m, d) for m, d in _chart_layers(by_time[0]) if m in ("point", "circle")]
    assert len(time_data) == 1  # only the trained run has both a training time and an average


def test_missed_queries_show_texts(costed_app, costed):
    """Problem 7: a missed query shows its text and its relevant passage's text, read from the benchmark
    the run's spec names; the per-query file does not record the rank-1 passage, and the page says so."""
    path, ids = costed
    app = costed_app
    app.sidebar.radio[0].set_value("Run").run()
    app.selectbox(key="run_page").set_value(f"mini-text_a ({ids['text_a']})").run()
    app.selectbox(key="miss_metric").set_value("f1@1").run()
    assert not app.exception
    misses = next(d.value for d in app.dataframe if "qid" in d.value.columns)
    assert sorted(misses["qid"]) == sorted(f"q{i}" for i in range(0, 12, 2))
    row = misses.set_index("qid").loc["q4"]
    assert row["query"] == "질문 4 내용"
    assert row["relevant passage"] == "문서 4 본문"
    texts = [m.value for m in app.markdown] + [c.value for c in app.caption]
    assert any("rank 1" in t and "not record" in t for t in texts), texts


def test_a_miss_shows_the_passage_retrieved_first(costed_app, costed):
    """A per-query file that records the rank-1 passage (koe5 writes `top_document`) shows its text beside
    the relevant one."""
    path, ids = costed
    app = costed_app
    app.sidebar.radio[0].set_value("Run").run()
    app.selectbox(key="run_page").set_value(f"mini-text_b ({ids['text_b']})").run()
    app.selectbox(key="miss_metric").set_value("f1@1").run()
    assert not app.exception
    misses = next(d.value for d in app.dataframe if "qid" in d.value.columns).set_index("qid")
    assert misses.loc["q7", "relevant passage"] == "문서 7 본문"
    assert misses.loc["q7", "retrieved first"] == "문서 8 본문"
    assert not any("not record" in c.value for c in app.caption)


def test_wins_and_losses_against_another_run(costed_app, costed):
    """Problem 8: per query, this run against another chosen run by a chosen metric: wins, losses, ties."""
    path, ids = costed
    app = costed_app
    app.sidebar.radio[0].set_value("Run").run()
    app.selectbox(key="run_page").set_value(f"mini-text_a ({ids['text_a']})").run()
    app.selectbox(key="miss_metric").set_value("f1@1").run()
    app.selectbox(key="wins_against").set_value(f"mini-text_b ({ids['text_b']})").run()
    assert not app.exception
    # A hits the odd queries, B the first six: A wins 7, 9, 11, loses 0, 2, 4, ties the other six.
    assert any("3 wins, 3 losses, 6 ties" in m.value for m in app.markdown), [m.value for m in app.markdown]
    table = next(d.value for d in app.dataframe if "outcome" in d.value.columns)
    outcome = table.set_index("qid")["outcome"]
    assert sorted(outcome[outcome == "win"].index) == ["q11", "q7", "q9"]
    assert sorted(outcome[outcome == "loss"].index) == ["q0", "q2", "q4"]
    assert table.set_index("qid").loc["q7", "query"] == "질문 7 내용"


def test_averages_before_per_benchmark_columns(app, demo):
    """Problem 9: at 1500 px the averages were cut off: the run's name and the averages come first, before
    the per-benchmark columns, and the name is pinned while scrolling sideways."""
    import json

    df = app.dataframe[0].value
    cols = list(df.columns)
    assert cols[0] == "name", cols
    first_bench = min(i for i, c in enumerate(cols) if c.startswith(("ko-strategyqa", "autorag-ko")))
    avgs = [i for i, c in enumerate(cols) if c.startswith("Avg ")]
    assert avgs and max(avgs) < first_bench, cols
    # The averages' Δ columns after every average: the five averages fit beside the name in 1500 px.
    assert max(avgs) < min(i for i, c in enumerate(cols) if c.startswith("Δ ")), cols
    config = json.loads(app.dataframe[0].proto.columns)
    assert config.get("name", {}).get("pinned") is True, config


# --- Evaluation during training (eval.every): the run page draws a metric against the step.

@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A run with evaluations during training on two benchmarks, folded from an eval_log.jsonl as koe5-run
    folds the trainer's, and the trainer's summary (keep_best's step, an early stop, evaluation seconds)."""
    import json

    from koe5.registry.demo import spec_yaml

    tmp = tmp_path_factory.mktemp("board_eval")
    path = tmp / "reg.duckdb"
    ids = make_demo_registry(path)
    reg = Registry(path)
    ids["evaluated"] = reg.create_run("eval-every", "hash-eval-every", spec_yaml("eval-every"), status="running")
    rows = [{"step": step, "benchmark": bench, "seconds": 1.5,
             "metrics": {"ndcg@10": value, "recall@10": min(1.0, value + 0.2)}}
            for step, a, b in ((50, 0.31, 0.40), (100, 0.36, 0.42), (150, 0.34, 0.45))
            for bench, value in (("ko-strategyqa", a), ("autorag-ko", b))]
    (tmp / "eval_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reg.fold_eval_log(ids["evaluated"], tmp / "eval_log.jsonl")
    reg.set_train_summary(ids["evaluated"], {
        "steps": 150, "total_steps": 400, "seconds": 90.0, "eval_seconds": 9.0, "stopped_early_at": 150,
        "best": {"benchmark": "ko-strategyqa", "metric": "ndcg@10", "step": 100, "value": 0.36}})
    reg.set_status(ids["evaluated"], "finished")
    return path, ids, rows


def test_run_view_draws_the_metric_against_the_step(evaluated, monkeypatch):
    path, ids, rows = evaluated
    app = open_app(path, monkeypatch)
    app.sidebar.radio[0].set_value("Run").run()
    app.selectbox(key="run_page").set_value(f"eval-every ({ids['evaluated']})").run()
    assert not app.exception
    picker = app.selectbox(key="eval_curve_metric")
    assert picker.value == "NDCG@10"  # the metric keep_best watched
    assert picker.options == ["NDCG@10", "Recall@10"]

    def drawn() -> dict:
        (_, data), = [(m, d) for m, d in _chart_layers(_charts(app)[0]) if m == "line"]
        value = next(c for c in data.columns if c.endswith("(x100)"))
        return {(int(r["step"]), r["benchmark"]): r[value] for _, r in data.iterrows()}

    expected = {(r["step"], r["benchmark"]): pytest.approx(100 * r["metrics"]["ndcg@10"]) for r in rows}
    assert drawn() == expected
    picker.set_value("Recall@10").run()
    assert drawn() == {(r["step"], r["benchmark"]): pytest.approx(100 * r["metrics"]["recall@10"]) for r in rows}
    captions = " ".join(c.value for c in app.caption).lower()
    assert "9.0 s of the 90.0 s training loop (10.0%)" in captions
    assert "exported step 100 of 150" in captions and "stopped early after step 150 of 400" in captions


def test_run_view_of_a_run_without_evaluations_during_training_has_no_curve(evaluated, monkeypatch):
    path, ids, _ = evaluated
    app = open_app(path, monkeypatch)
    app.sidebar.radio[0].set_value("Run").run()
    app.selectbox(key="run_page").set_value(f"e5-small-ko-ft ({ids['trained']})").run()
    assert not app.exception
    assert not [s for s in app.selectbox if s.key == "eval_curve_metric"]
    assert not any("During training" in m.value for m in app.markdown)
