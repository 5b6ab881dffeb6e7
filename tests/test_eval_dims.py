"""Matryoshka evaluation (eval.dims, `koe5 eval --dims`): metrics at truncated embedding widths equal
sentence-transformers' `truncate_dim` scored by pytrec_eval, are recorded per width, and never mix with the
full width in any reader that does not ask for a width."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from koe5 import cli
from koe5.registry import Registry
from koe5.registry import connect as connect_mod
from test_eval_during_training import pytrec_metrics
from test_spec_errors import errors_for, put, valid_spec

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "koe5" / "assets" / "ko_sample" / "bench"
KS = (1, 3, 10)
DIMS = (32, 64)  # the demo model is 128 wide


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The untrained demo model exported as a sentence-transformers directory (the export koe5-run writes),
    so sentence-transformers' own `truncate_dim` can be the reference."""
    from transformers import AutoModel, AutoTokenizer

    from koe5.export import export_model
    from koe5.model import model_max_length, resolve_model_path

    path = resolve_model_path("builtin:tiny-ko-bert")
    backbone, tokenizer = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    out = tmp_path_factory.mktemp("dims") / "model"
    return export_model(backbone, tokenizer, out, pooling="mean", normalize=True, query_prefix="query: ",
                        passage_prefix="passage: ", max_seq_length=model_max_length(backbone.config, tokenizer))


def reference_metrics(model_dir: Path, dim: int | None) -> dict[str, float]:
    """NDCG@k and Recall@k of the sample benchmark, independently of koe5's evaluation: sentence-transformers
    with `truncate_dim` (and its normalization), exact scores over the whole corpus, pytrec_eval."""
    from sentence_transformers import SentenceTransformer

    from koe5.eval.benchmark import load_benchmark

    st = SentenceTransformer(str(model_dir), device="cpu", truncate_dim=dim)
    bench = load_benchmark(str(BENCH_DIR))
    queries = st.encode(bench.query_texts, prompt_name="query", normalize_embeddings=True)
    passages = st.encode(bench.corpus_texts, prompt_name="passage", normalize_embeddings=True)
    assert queries.shape[1] == (dim or 128)
    return pytrec_metrics(bench, queries, passages, KS)


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- the numbers -----------------------------------------------------------------------------------

def test_each_width_equals_sentence_transformers_truncate_dim_and_is_recorded(exported, tmp_path, capsys):
    """Catches a width scored without renormalization, truncation of one side only, the wrong slice, and
    a width re-encoded (the cache holds the full embeddings once: one file for queries, one for passages)."""
    registry = tmp_path / "reg.duckdb"
    code, out, err = run_cli(capsys, "eval", "--model", exported, "--benchmark", f"ko-sample={BENCH_DIR}",
                             "--k", *KS, "--dims", ",".join(map(str, DIMS)), "--registry", registry,
                             "--cache-dir", tmp_path / "emb", "--json")
    assert code == 0, err
    printed = json.loads(out)
    [result] = printed["results"]
    assert result["dim"] == 128 and sorted(result["metrics_at_dims"]) == ["32", "64"]
    assert len(list((tmp_path / "emb").glob("*.npy"))) == 2  # encoded once, at the full width

    full = reference_metrics(exported, None)
    for name, value in full.items():
        assert result["metrics"][name] == pytest.approx(value, abs=1e-6), name
    for dim in DIMS:
        want = reference_metrics(exported, dim)
        for name, value in want.items():
            assert result["metrics_at_dims"][str(dim)][name] == pytest.approx(value, abs=1e-6), (dim, name)
    # Guard against a vacuous match: the narrowest width really scores otherwise than the full one.
    assert reference_metrics(exported, 32) != full

    run = Registry(registry).get_run(printed["run_id"])
    assert {(m["metric"], m["k"]): m["value"] for m in run["metrics"]} == {
        tuple_key(n): v for n, v in result["metrics"].items()}
    recorded = {(m["dim"], m["metric"], m["k"]): m["value"] for m in run["dim_metrics"]}
    assert recorded == {(int(d), *tuple_key(n)): v for d, ms in result["metrics_at_dims"].items() for n, v in ms.items()}
    assert {m["model_dim"] for m in run["dim_metrics"]} == {128}
    assert json.loads(Path(next(a["path"] for a in run["artifacts"] if a["kind"] == "eval_settings"))
                      .read_text())["eval"]["dims"] == list(DIMS)


def tuple_key(name: str) -> tuple[str, int]:
    metric, k = name.split("@")
    return metric, int(k)


def test_the_width_is_part_of_a_baselines_identity_only_when_there_are_widths(exported):
    """An evaluation without widths keeps the identity it always had (recorded baselines are still found);
    one with widths is another baseline, since it records more rows."""
    from koe5.encoder import load_encoder
    from koe5.eval.benchmark import load_benchmark
    from koe5.eval.model_eval import EncodeSettings, describe, identity

    encoder = load_encoder(str(exported), device="cpu")
    benches = [load_benchmark(str(BENCH_DIR))]
    settings = EncodeSettings("query: ", "passage: ", 64, 64)
    plain = describe(encoder, "m", settings, benches, KS)
    assert "dims" not in plain["eval"]
    assert identity(describe(encoder, "m", settings, benches, KS, dims=[])) == identity(plain)
    assert identity(describe(encoder, "m", settings, benches, KS, dims=[32])) != identity(plain)


# ---- bad widths ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims, path, gist", [
    ([0, 64], "eval.dims[0]", "expected a positive width"),
    ([], "eval.dims", "expected at least one width"),
    ([64, 64], "eval.dims", "each width at most once"),
    (["wide"], "eval.dims[0]", "int"),
])
def test_bad_eval_dims_are_named_by_key_path(tmp_path, dims, path, gist):
    errors = errors_for(tmp_path, put(valid_spec(), "eval.dims", dims))
    assert any(p == path and gist in message for p, message in errors), errors


def test_a_width_beyond_the_model_is_refused_before_any_weight_loads():
    from koe5.orchestrate.checks import ModelError, check_model
    from koe5.spec.schema import DataSpec, EvalSpec, ModelSpec, SourceSpec, Spec

    def spec_with(dims):
        return Spec(name="m", model=ModelSpec(name_or_path="builtin:tiny-ko-bert"),
                    data=DataSpec(sources=[SourceSpec(path="x")]), eval=EvalSpec(dims=dims))

    check_model(spec_with([128, 64]))  # the full width may be listed
    with pytest.raises(ModelError, match=r"^eval.dims: \[256\] wider than the embeddings .* \(128 "):
        check_model(spec_with([64, 256]))


@pytest.mark.parametrize("dims, gist", [("256,64", "--dims: [256] wider than the model's embeddings (128"),
                                        ("64,x", "--dims takes comma-separated positive widths"),
                                        ("0", "--dims takes comma-separated positive widths")])
def test_koe5_eval_refuses_bad_dims_in_one_line(exported, capsys, dims, gist):
    code, out, err = run_cli(capsys, "eval", "--model", exported, "--benchmark", BENCH_DIR, "--dims", dims,
                             "--no-record", "--no-cache")
    assert code == 2 and gist in err and "Traceback" not in err


# ---- the registry ----------------------------------------------------------------------------------

FULL = {("ndcg", 10): 0.5, ("recall", 10): 0.6}


def record_widths(reg: Registry, name: str, full: float, at: dict[int, float], benchmarks=("b1",),
                  kind: str = "train") -> str:
    """A finished run with NDCG@10 `full` at the full width (128) and at[d] at each truncated width d."""
    rid = reg.create_run(name, name, "model: {name_or_path: m}\n", kind=kind, status="running")
    for bench in benchmarks:
        reg.add_metrics(rid, bench, {("ndcg", 10): full}, fingerprint="fp", evaluator_version="1", model_dim=128)
        for dim, value in at.items():
            reg.add_metrics(rid, bench, {("ndcg", 10): value}, fingerprint="fp", evaluator_version="1", dim=dim,
                            model_dim=128)
    reg.set_status(rid, "finished")
    return rid


def test_per_width_rows_are_stored_apart_and_replaced_per_width(tmp_path):
    reg = Registry(tmp_path / "r.duckdb")
    rid = record_widths(reg, "a", 0.5, {32: 0.3, 64: 0.4})
    reg.add_metrics(rid, "b1", {("ndcg", 10): 0.45}, fingerprint="fp", evaluator_version="1", dim=64, model_dim=128)
    run = reg.get_run(rid)
    assert [(m["metric"], m["k"], m["value"]) for m in run["metrics"]] == [("ndcg", 10, 0.5)]
    assert [(m["dim"], m["value"]) for m in run["dim_metrics"]] == [(32, 0.3), (64, 0.45)]  # 64 replaced, alone
    from koe5.registry import RegistryError

    with pytest.raises(RegistryError, match="below the model's full width 128"):
        reg.add_metrics(rid, "b1", FULL, dim=128, model_dim=128)


def test_a_registry_of_the_previous_schema_migrates_and_its_metrics_read_as_full_width(tmp_path, monkeypatch):
    """Metrics recorded before the width existed are the full width; after the migration a reader finds them
    as the run's metrics and a width can be recorded beside them."""
    schema = connect_mod.schema_path().read_text()
    sections = connect_mod.schema_sections(schema)
    assert "dim" in sections[-1][1]  # the width is the newest section
    older = tmp_path / "schema.sql"
    older.write_text("".join(f"-- @version {v}\n{sql}" for v, sql in sections[:-1]))
    reg = Registry(tmp_path / "old.duckdb")
    monkeypatch.setattr(connect_mod, "schema_path", lambda: older)
    rid = reg.create_run("old", "h", "")
    with connect_mod.write_connection(reg.path) as con:  # what the older koe5 wrote: 8 columns
        con.execute("INSERT INTO metrics VALUES (?, 'b1', 'ndcg', 10, 0.7, 'fp', '1', now())", [rid])
    monkeypatch.undo()
    run = reg.get_run(rid)  # a reader migrates
    assert [(m["metric"], m["value"]) for m in run["metrics"]] == [("ndcg", 0.7)] and run["dim_metrics"] == []
    assert reg.list_runs()[0]["headline"] == {"b1": 0.7}
    reg.add_metrics(rid, "b1", {("ndcg", 10): 0.2}, dim=32, model_dim=128)
    run = reg.get_run(rid)
    assert [m["value"] for m in run["metrics"]] == [0.7] and [m["value"] for m in run["dim_metrics"]] == [0.2]
    _, rows = reg.query("SELECT max(version) FROM schema_version")
    assert rows == [(sections[-1][0],)]


def test_readers_that_do_not_ask_for_a_width_read_the_full_width_only(tmp_path, capsys):
    """Run `small` is worse at the full width but has a high value at a truncated width: any reader that
    mixed the widths in would rank it first or report its truncated value."""
    from koe5.registry.board import leaderboard, load_metrics, load_runs

    path = tmp_path / "r.duckdb"
    reg = Registry(path)
    small = record_widths(reg, "small", 0.5, {32: 0.95, 64: 0.9})
    plain = record_widths(reg, "plain", 0.6, {})

    headline = {r["name"]: r["headline"] for r in reg.list_runs(sort_metric="ndcg@10")}
    assert headline == {"small": {"b1": 0.5}, "plain": {"b1": 0.6}}
    assert [r["name"] for r in reg.list_runs(sort_metric="ndcg@10")] == ["plain", "small"]

    code, out, err = run_cli(capsys, "best", "--metric", "ndcg@10", "--registry", path, "--json")
    assert code == 0, err
    assert json.loads(out)["name"] == "plain" and json.loads(out)["value"] == pytest.approx(0.6)

    code, out, err = run_cli(capsys, "compare", small, plain, "--registry", path, "--json")
    assert code == 0, err
    assert [r["values"] for r in json.loads(out)["metrics"]] == [[0.5, 0.6]]

    table, _ = leaderboard(load_runs(reg), load_metrics(reg), metric_keys=[("ndcg", 10)], deltas="none")
    assert dict(zip(table["name"], table["Avg NDCG@10 (x100)"])) == {"plain": 60.0, "small": 50.0}

    # koe5 show lists every width, the full one last under its number
    code, out, err = run_cli(capsys, "show", small, "--registry", path)
    assert code == 0, err
    lines = out.split("metrics per embedding width")[1].splitlines()
    assert lines[1].split() == ["benchmark", "metric", "(x100)", "32", "64", "128", "(full)"]
    assert lines[2].split() == ["b1", "ndcg@10", "95.00", "90.00", "50.00"]


def test_base_against_trained_compares_each_width_with_the_same_width(tmp_path):
    """koe5-run's closing table reads the baseline from the registry: the full width against the full
    width, each truncated width against its own."""
    from koe5.eval.evaluate import EvalResult
    from koe5.eval.metrics import MetricResult
    from koe5.eval.model_eval import format_comparison

    reg = Registry(tmp_path / "r.duckdb")
    base = reg.get_run(record_widths(reg, "base", 0.5, {32: 0.2}, kind="baseline"))
    table = {(m["benchmark"], m["metric"], m["k"]): m["value"] for m in base["metrics"]}
    table.update({(m["benchmark"], m["metric"], m["k"], m["dim"]): m["value"] for m in base["dim_metrics"]})

    def metrics(value):
        return MetricResult(ks=[10], aggregate={(m, 10): value for m in ("ndcg", "recall", "precision", "f1", "mrr",
                                                                           "map")},
                            per_query={}, n_queries=1, n_excluded=0, excluded=[], first_relevant_rank={})

    trained = EvalResult("b1", "fp", metrics(0.7), 1, {}, dim=128, at_dims={32: metrics(0.6)})
    rows = {line.split()[0] + (" " + line.split()[1] if "@32d" in line else ""): line.split()
            for line in format_comparison(table, [trained], [10]).splitlines()}
    assert rows["ndcg@10"][1:] == ["50.00", "70.00", "+20.00"]
    assert rows["ndcg@10 @32d"][2:] == ["20.00", "60.00", "+40.00"]


# ---- the leaderboard's plot --------------------------------------------------------------------------

def test_width_points_give_one_line_per_run_with_more_than_one_width(tmp_path):
    """Catches a plot that mixes runs without widths in, drops the full-width point, averages fewer
    benchmarks at one width than at another, or shows a run the filters hid."""
    from koe5.registry.board import load_runs, load_width_metrics, width_points

    reg = Registry(tmp_path / "r.duckdb")
    two = record_widths(reg, "two", 0.5, {32: 0.3, 64: 0.4}, benchmarks=("b1", "b2"))
    reg.add_metrics(two, "b2", {("ndcg", 10): 0.1}, dim=64, model_dim=128)  # b2 differs at 64 only
    record_widths(reg, "plain", 0.6, {})
    partial = record_widths(reg, "partial", 0.5, {64: 0.2}, benchmarks=("b1", "b2"))
    with connect_mod.write_connection(reg.path) as con:  # b2 was never evaluated at 64 for this run
        con.execute("DELETE FROM metrics WHERE run_id = ? AND benchmark = 'b2' AND dim = 64", [partial])
    runs, widths = load_runs(reg), load_width_metrics(reg)

    points = width_points(runs, widths, "ndcg", 10)
    got = {(r.name, r.width, r.full): round(r._5, 6) for r in points.itertuples()}
    assert got == {("two", 32, False): 30.0, ("two", 64, False): 25.0, ("two", 128, True): 50.0}
    assert list(points.columns) == ["run_id", "name", "width", "full", "NDCG@10 (x100)"]

    one = width_points(runs, widths, "ndcg", 10, benchmark="b2")
    assert {(r.name, r.width): round(r._5, 6) for r in one.itertuples()} == {
        ("two", 32): 30.0, ("two", 64): 10.0, ("two", 128): 50.0}
    assert width_points(runs[runs["name"] != "two"], widths, "ndcg", 10).empty
    assert width_points(runs, widths, "recall", 10).empty



def test_the_widths_view_draws_each_runs_metric_against_the_width(tmp_path, monkeypatch):
    """The leaderboard's Widths view draws width_points: the run with widths, never the run without."""
    from test_leaderboard_app import _chart_layers, _charts, open_app

    reg = Registry(tmp_path / "r.duckdb")
    two = record_widths(reg, "two", 0.5, {32: 0.3, 64: 0.4})
    record_widths(reg, "plain", 0.6, {})
    app = open_app(reg.path, monkeypatch)
    app.sidebar.radio[0].set_value("Widths").run()
    assert not app.exception, app.exception
    assert app.selectbox(key="width_metric").value == "NDCG@10"
    (_, data), = [(m, d) for m, d in _chart_layers(_charts(app)[0]) if m == "line"]
    assert {(r["run"], int(r["width"])): r["NDCG@10 (x100)"] for _, r in data.iterrows()} == {
        (f"two ({two})", 32): pytest.approx(30.0), (f"two ({two})", 64): pytest.approx(40.0),
        (f"two ({two})", 128): pytest.approx(50.0)}


# ---- koe5-run ------------------------------------------------------------------------------------------

def test_koe5_run_evaluates_the_trained_model_and_the_baseline_at_the_loss_widths(exported, tmp_path):
    """eval.dims null: the widths of loss.matryoshka_dims (the full one listed there is evaluated once, as
    the full width). The baseline is evaluated at the same widths; each width equals sentence-transformers'
    truncate_dim on the untrained model (`exported`) and on the exported trained one; and the closing table
    compares each width with the same width of the base."""
    from test_quickstart import QUICKSTART, koe5_run

    registry = tmp_path / "koe5.duckdb"
    proc = koe5_run(str(QUICKSTART), "train.max_steps=2", "loss.matryoshka_dims=[128, 32]",
                    f"output_dir={tmp_path / 'runs'}", registry=registry)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    reg = Registry(registry)
    runs = {r["kind"]: reg.get_run(r["run_id"]) for r in reg.list_runs()}
    model_dir = Path(next(a["path"] for a in runs["train"]["artifacts"] if a["kind"] == "model"))
    for kind, directory in (("train", model_dir), ("baseline", exported)):
        rows = runs[kind]["dim_metrics"]
        assert {m["dim"] for m in rows} == {32} and {m["model_dim"] for m in rows} == {128}, kind
        got = {f"{m['metric']}@{m['k']}": m["value"] for m in rows}
        for name, value in reference_metrics(directory, 32).items():
            assert got[name] == pytest.approx(value, abs=1e-6), (kind, name)
    # The table koe5-run ends with: the base's and the trained model's value at 32 and their change.
    base = {(m["metric"], m["k"]): m["value"] for m in runs["baseline"]["dim_metrics"]}
    trained = {(m["metric"], m["k"]): m["value"] for m in runs["train"]["dim_metrics"]}
    [row] = [line.split() for line in proc.stdout.splitlines() if line.startswith("ndcg@10 @32d")]
    b, t = 100 * base[("ndcg", 10)], 100 * trained[("ndcg", 10)]
    assert row[2:] == [f"{b:.2f}", f"{t:.2f}", f"{t - b:+.2f}"]
