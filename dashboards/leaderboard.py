"""koe5 leaderboard: `streamlit run dashboards/leaderboard.py [-- --registry PATH]`.

The registry path comes from --registry, else $KOE5_REGISTRY, else registry/koe5.duckdb. Every query
opens a short read-only connection (koe5.registry), so a running training job can always write; query
results are cached for a few seconds only, never the connection.
"""

from __future__ import annotations

import argparse
import sys

import altair as alt
import pandas as pd
import streamlit as st

from koe5.registry import Registry, RegistryError
from koe5.registry.board import (CURVES, DELTA_MODES, TABLE_METRICS, X100, candidate_benchmark_paths, column_name,
                                 eval_curve, flat_spec, leaderboard, load_metrics, load_runs, load_train_log, metric_label,
                                 metric_options, parse_metric_label, runs_with_train_log, spec_key_options,
                                 load_width_metrics, sweep_baselines, sweep_keys, sweep_points, width_points,
                                 wins_losses, with_texts)
from koe5.registry.commands import curve_metric, per_query_metric_columns, run_per_query, training_notes
from koe5.registry.store import METRICS
from koe5.spec.diff import diff_yaml

TTL_S = 5
VIEWS = ("Leaderboard", "Sweeps", "Widths", "Training curves", "Run")


def registry_path() -> str | None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--registry")
    args, _ = parser.parse_known_args(sys.argv[1:])
    return args.registry


@st.cache_data(ttl=TTL_S, show_spinner=False)
def cached_tables(path: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    reg = Registry(path)
    return load_runs(reg), load_metrics(reg)


def filters(runs: pd.DataFrame, metrics: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    sb = st.sidebar
    all_tags = sorted({t for ts in runs["tags"] for t in ts})
    tags = sb.multiselect("Tag", all_tags)
    statuses = sb.multiselect("Status", sorted(runs["status"].unique()))
    kinds = sb.multiselect("Kind", sorted(runs["kind"].unique()))
    models = sb.multiselect("Model", sorted(m for m in runs["model"].dropna().unique()))
    sweeps = ["(any)"] + sorted(s for s in runs["sweep_id"].dropna().unique())
    sweep = sb.selectbox("Sweep", sweeps)
    all_benches = sorted(metrics["benchmark"].unique())
    benches = sb.multiselect("Benchmarks", all_benches, default=all_benches)
    keep = pd.Series(True, index=runs.index)
    if tags:
        keep &= runs["tags"].map(lambda ts: bool(set(ts) & set(tags)))
    if statuses:
        keep &= runs["status"].isin(statuses)
    if kinds:
        keep &= runs["kind"].isin(kinds)
    if models:
        keep &= runs["model"].isin(models)
    if sweep != "(any)":
        keep &= runs["sweep_id"] == sweep
    return runs[keep], benches


def view_leaderboard(runs: pd.DataFrame, metrics: pd.DataFrame, benches: list[str], all_runs: pd.DataFrame) -> None:
    st.subheader("Leaderboard")
    options = metric_options(metrics)
    c1, c2, c3 = st.columns([3, 3, 2])
    chosen = c1.multiselect("Metrics", options, default=[m for m in (metric_label(*mk) for mk in TABLE_METRICS)
                                                         if m in options])
    keys = c2.multiselect("Spec columns", spec_key_options(runs),
                          help="Key paths of the runs' resolved specs, e.g. train.lr, loss.temperature.")
    deltas = c3.selectbox("Change against the base model", DELTA_MODES)
    st.caption("Metrics x100: per benchmark, and their average over the chosen benchmarks. Δ = the run minus its "
               "base model: the newest baseline run of the same model.name_or_path on the same benchmark version "
               "(blank when there is none). Bold green = best in column. † = stale: a different benchmark "
               "fingerprint or evaluator version than the rest of the column; stale values are never averaged.")
    metric_keys = [parse_metric_label(m) for m in chosen]
    table, stale = leaderboard(runs, metrics, benches, metric_keys, keys, all_runs, deltas)
    if table.empty:
        st.info("No runs match the filters.")
        return
    numeric = [c for c in table.columns if c.endswith(X100)]
    best = {c: table.loc[~stale[c], c].max() for c in numeric}

    def style(col: pd.Series) -> list[str]:
        if col.name not in best:
            return [""] * len(col)
        return ["background-color: #f8d7da" if s else
                "font-weight: bold; background-color: #d4edda" if pd.notna(v) and v == best[col.name] else ""
                for v, s in zip(col, stale[col.name])]

    shown = table.copy()
    flags = stale[numeric].to_numpy()
    shown["stale"] = ["† " + ", ".join(c for c, f in zip(numeric, row) if f) if row.any() else "" for row in flags]
    formats = {c: "{:+.2f}" if c.startswith("Δ ") else "{:.2f}" for c in numeric}
    formats.update({"params (M)": "{:,.2f}", "train time (min)": "{:,.1f}"})
    styled = shown.style.apply(style, axis=0).format(formats, na_rep="–")
    # The name stays in sight while the table scrolls sideways (the averages come right after it).
    # placeholder: Streamlit shows a missing cell as "None" whatever the Styler's na_rep says.
    st.dataframe(styled, hide_index=True, width="stretch", placeholder="–",
                 column_config={"name": st.column_config.Column(pinned=True)})
    st.caption("params (M) and embedding dim: from the run's model directory (its exported model, or the local "
               "model a baseline evaluated); train time: the training loop's last logged elapsed time; device: as "
               "recorded by the run. Blank where the registry does not know.")
    avg = column_name("Avg", *metric_keys[0]) if metric_keys else None
    if avg in table and table[avg].notna().any():
        top = table.loc[table[avg].idxmax()]
        st.markdown(f"Best by {avg}: **{top['name']}** (`{top['run_id']}`, {top['kind']}) — {top[avg]:.2f}")
        quality_plots(table, avg)
    st.caption(f"{len(table)} runs: " + ", ".join(f"{n} {k}" for k, n in table["kind"].value_counts().items()))


def quality_chart(table: pd.DataFrame, x: str, y: str, log_x: bool) -> alt.Chart:
    """One point per run: quality `y` against cost `x`, as MTEB's leaderboard plots score against size.
    Columns renamed to plain names (Vega-Lite reads '.' and '[' in a field name as a path)."""
    data = pd.DataFrame({"x": table[x].astype(float), "y": table[y].astype(float), "run": table["name"],
                         "kind": table["kind"]})
    scale = alt.Scale(type="log") if log_x else alt.Undefined
    return alt.Chart(data).mark_circle(size=80).encode(
        x=alt.X("x:Q", title=x, scale=scale, axis=alt.Axis(format="~g")),
        y=alt.Y("y:Q", title=y, scale=alt.Scale(zero=False), axis=alt.Axis(format=".1f")),
        color=alt.Color("kind:N", title="kind"), tooltip=["run:N", "kind:N", "x:Q", "y:Q"])


def quality_plots(table: pd.DataFrame, avg: str) -> None:
    """The first chosen metric's average against model size and against training time, over the runs that
    have both numbers (a run with a blank size or time is left out, not put at zero)."""
    for col, (x, log_x) in zip(st.columns(2), (("params (M)", True), ("train time (min)", False))):
        known = table[table[avg].notna() & table[x].notna()] if x in table else table.iloc[:0]
        col.markdown(f"**{avg} against {x}**")
        if known.empty:
            col.info(f"No shown run has both {avg} and a known {x}.")
        else:
            col.altair_chart(quality_chart(known, x, avg, log_x), width="stretch")


def sweep_chart(points: pd.DataFrame, baselines: pd.DataFrame, key: str, label: str) -> alt.Chart:
    """The metric against the swept value, with each baseline (the untrained model) as a dashed horizontal
    line: it has no swept value of its own, so as a point it would make the line jump at its x.
    The chart's columns are renamed to plain names because Vega-Lite reads '.' and '[' in a field name as
    a path (train.batch_size)."""
    data = pd.DataFrame({"x": points[key], "y": points[label], "run": points["name"]})
    numeric = pd.api.types.is_numeric_dtype(points[key])
    mark = alt.Chart(data).mark_line(point=True) if numeric else alt.Chart(data).mark_bar()
    chart = mark.encode(x=alt.X("x", type="quantitative" if numeric else "nominal", title=key),
                        y=alt.Y("y:Q", title=label), tooltip=["run:N", "x", "y:Q"])
    if baselines.empty:
        return chart
    rules = pd.DataFrame({"y": baselines[label], "baseline": baselines["name"]})
    rule = alt.Chart(rules).mark_rule(strokeDash=[6, 4]).encode(
        y="y:Q", color=alt.Color("baseline:N", title="baseline (untrained)"), tooltip=["baseline:N", "y:Q"])
    return chart + rule


def view_sweeps(reg: Registry, runs: pd.DataFrame, metrics: pd.DataFrame) -> None:
    st.subheader("Sweeps")
    sweep_ids = sorted(runs["sweep_id"].dropna().unique())
    if not sweep_ids:
        st.info("No sweep runs in the registry.")
        return
    sweep = st.selectbox("Sweep", sweep_ids, key="sweep_view")
    keys = sweep_keys(reg, runs, sweep)
    if not keys:
        st.info("This sweep recorded no swept keys.")
        return
    c1, c2, c3 = st.columns(3)
    key = c1.selectbox("Swept key", keys)
    options = metric_options(metrics) or ["NDCG@1"]
    metric = c2.selectbox("Metric", options, index=options.index("NDCG@1") if "NDCG@1" in options else 0)
    bench = c3.selectbox("Benchmark", ["(mean)"] + sorted(metrics["benchmark"].unique()))
    name, k = parse_metric_label(metric)
    bench = None if bench == "(mean)" else bench
    points = sweep_points(runs, metrics, sweep, key, name, k, bench)
    if points.empty:
        st.info("No run of this sweep has that metric yet.")
        return
    label = metric + X100
    baselines = sweep_baselines(runs, metrics, sweep, name, k, bench)
    st.altair_chart(sweep_chart(points, baselines, key, label), width="stretch")
    st.dataframe(points, hide_index=True)
    if not baselines.empty:
        st.caption("Dashed lines: " + ", ".join(f"{b['name']} (`{b['run_id']}`) {b[label]:.2f}"
                                               for _, b in baselines.iterrows()))


def view_widths(reg: Registry, runs: pd.DataFrame) -> None:
    """Quality against embedding width (Matryoshka evaluation, eval.dims): one line per run evaluated at more
    than one width, the full width's point included."""
    st.subheader("Quality against embedding width")
    widths = load_width_metrics(reg)
    if widths.empty:
        st.info("No run was evaluated at truncated widths: set eval.dims (or loss.matryoshka_dims), or "
                "`koe5 eval --dims 64,128`.")
        return
    c1, c2 = st.columns(2)
    options = metric_options(widths)
    metric = c1.selectbox("Metric", options, index=options.index("NDCG@10") if "NDCG@10" in options else 0,
                          key="width_metric")
    bench = c2.selectbox("Benchmark", ["(mean)"] + sorted(widths["benchmark"].unique()), key="width_benchmark")
    name, k = parse_metric_label(metric)
    points = width_points(runs, widths, name, k, None if bench == "(mean)" else bench)
    if points.empty:
        st.info("No shown run has that metric at more than one width.")
        return
    label = metric + X100
    data = points.assign(run=[f"{n} ({r})" for n, r in zip(points["name"], points["run_id"])])
    st.altair_chart(alt.Chart(data).mark_line(point=True).encode(
        x=alt.X("width:Q", title="embedding width (dimensions)"), y=alt.Y(f"{label}:Q", title=label),
        color=alt.Color("run:N", title="run"), tooltip=["run:N", "width:Q", "full:N", f"{label}:Q"]),
        width="stretch")
    st.dataframe(points, hide_index=True)


def view_curves(reg: Registry, runs: pd.DataFrame) -> None:
    st.subheader("Training curves")
    logged = runs_with_train_log(reg)
    trained = runs[runs["run_id"].isin(logged)]
    labels = {f"{r.name} ({r.run_id})": r.run_id for r in trained.itertuples()}
    chosen = st.multiselect("Runs", list(labels), default=list(labels)[:3], key="curve_runs")
    log = load_train_log(reg, [labels[c] for c in chosen])
    if log.empty:
        st.info("No training log recorded for these runs.")
        return
    log["run"] = log["run_id"].map({v: k for k, v in labels.items()})
    # A line needs two points: a run with one logged row (a one-step run, or one recorded before the
    # trainer logged its first step too) would draw nothing, so it is named and its row shown instead.
    rows = log.groupby("run")["step"].transform("size")
    for run, few in log[rows < 2].groupby("run"):
        st.info(f"{run}: fewer than 2 logged rows ({len(few)}, step {', '.join(map(str, few['step']))}), so no "
                f"curve. The trainer logs the first step, every train.log_every steps and the last step; lower "
                f"train.log_every to see more of a run this short.")
        st.dataframe(few[["step", *CURVES]], hide_index=True)
    log = log[rows >= 2]
    if log.empty:
        return
    for col in CURVES:
        st.markdown(f"**{col}**")
        # Long format, one line per run over its own rows: a wide table (a column per run, a row per step of
        # any run) leaves gaps where runs logged different steps, and a gap breaks the line.
        data = log[["step", "run", col]].dropna().rename(columns={col: "value"})
        st.altair_chart(alt.Chart(data).mark_line(point=True).encode(
            x=alt.X("step:Q", title="step"), y=alt.Y("value:Q", title=col), color=alt.Color("run:N", title="run"),
            tooltip=["run:N", "step:Q", "value:Q"]), width="stretch")


def run_metrics_table(rows: list[dict]) -> pd.DataFrame:
    """A run's metric rows as the page shows them: x100, by benchmark, metric and k as a number."""
    df = pd.DataFrame(rows)
    df = df.assign(order=df["metric"].map({m: i for i, m in enumerate(METRICS)})).sort_values(
        ["benchmark", "order", "k"], kind="stable")
    return pd.DataFrame({"benchmark": df["benchmark"],
                         "metric": [metric_label(m, k) for m, k in zip(df["metric"], df["k"])],
                         "value" + X100: (df["value"] * 100).round(2),
                         "fingerprint": df["fingerprint"], "evaluator": df["evaluator_version"]})


def view_eval_during_training(run: dict) -> None:
    """The curve of a metric against the step from the evaluations during training (eval.every), and what
    they cost, the step exported (train.keep_best) and an early stop."""
    notes = training_notes(run.get("train_summary"))
    if not run["eval_log"] and not notes:
        return
    st.markdown("**During training**")
    for note in notes:
        st.caption(note[0].upper() + note[1:] + ".")
    if not run["eval_log"]:
        return
    options = metric_options(pd.DataFrame(run["eval_log"]))
    default = metric_label(*parse_metric_label(curve_metric(run["eval_log"], run.get("train_summary"))))
    metric = st.selectbox("Metric during training", options, index=options.index(default) if default in options
                          else 0, key="eval_curve_metric")
    curve = eval_curve(run["eval_log"], metric)
    value = metric + X100
    st.altair_chart(alt.Chart(curve).mark_line(point=True).encode(
        x=alt.X("step:Q", title="step"), y=alt.Y(f"{value}:Q", title=value),
        color=alt.Color("benchmark:N", title="benchmark"), tooltip=["benchmark:N", "step:Q", f"{value}:Q"]),
        width="stretch")


def view_run(reg: Registry, runs: pd.DataFrame, all_runs: pd.DataFrame) -> None:
    st.subheader("Run")
    if runs.empty:
        st.info("No runs.")
        return
    labels = [f"{r.name} ({r.run_id})" for r in runs.itertuples()]
    label = st.selectbox("Run", labels, key="run_page")
    run = reg.get_run(runs.iloc[labels.index(label)]["run_id"])
    st.markdown(f"**{run['name']}** `{run['run_id']}` — {run['kind']}, **{run['status']}**"
                + (f" — {run['error']}" if run.get("error") else ""))
    # Metrics first: they are what the page is opened for; the ~100-line spec comes after, folded away.
    if run["metrics"]:
        st.dataframe(run_metrics_table(run["metrics"]), hide_index=True)
    else:
        st.caption("No metrics recorded for this run.")
    view_eval_during_training(run)
    provenance = {k: run.get(k) for k in ("spec_hash", "git_commit", "git_dirty", "versions", "host", "devices",
                                          "world_size", "data_mix", "created_at", "started_at", "finished_at")}
    st.json({k: (str(v) if hasattr(v, "isoformat") else v) for k, v in provenance.items()}, expanded=False)
    with st.expander("Spec (resolved YAML)"):
        st.code(run["spec_yaml"], language="yaml")

    others = [l for l in labels if l != label]
    if others:
        other = st.selectbox("Diff against", others, key="diff_against")
        other_run = reg.get_run(runs.iloc[labels.index(other)]["run_id"])
        diffs = diff_yaml(other_run["spec_yaml"], run["spec_yaml"])
        st.dataframe(pd.DataFrame([(k, str(a), str(b)) for k, a, b in diffs],
                                  columns=["key", other_run["run_id"], run["run_id"]]), hide_index=True)

    per_query = run_per_query(run)
    if per_query is None:
        st.caption("No per-query results recorded for this run.")
        return
    cols = per_query_metric_columns(per_query)
    if not cols:
        return
    c1, c2 = st.columns(2)
    col = c1.selectbox("Misses by", cols, key="miss_metric")
    bench = None
    if "benchmark" in per_query.columns:
        bench = c2.selectbox("Benchmark", sorted(per_query["benchmark"].unique()), key="miss_benchmark")
        per_query = per_query[per_query["benchmark"] == bench]
    found, note = find_benchmark(run, all_runs, bench, per_query)
    texts = (lambda df: with_texts(df, found)) if found is not None else (lambda df: df)
    misses = per_query[per_query[col] == 0]
    st.markdown(f"**Queries missed** ({len(misses)} of {per_query[col].notna().sum()} with {col} = 0)")
    if "top_document" not in per_query.columns:  # files written before koe5 recorded the rank-1 passage
        note += (" This run's per-query file records the rank of the first relevant passage "
                 "(first_relevant_rank) but does not record which passage was retrieved at rank 1, so that "
                 "passage is not shown.")
    st.caption(note)
    st.dataframe(x100(texts(misses), cols), hide_index=True)
    wins_view(reg, run, runs, labels, per_query, col, bench, texts)


def x100(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """Per-query metric columns x100, their headers saying so."""
    cols = [c for c in cols if c in df.columns]
    return df.assign(**{c: df[c] * 100 for c in cols}).rename(columns={c: c + X100 for c in cols})


@st.cache_data(ttl=300, show_spinner=False, max_entries=8)
def cached_benchmark(path: str, name: str):
    """The benchmark folder's content, or the reason it cannot be read (kept for 5 minutes: a benchmark's
    files do not change under a run, and reading a large corpus takes seconds)."""
    from koe5.eval.benchmark import BenchmarkError, load_benchmark

    try:
        return load_benchmark(path, name)
    except (BenchmarkError, OSError) as e:
        return str(e)


def find_benchmark(run: dict, all_runs: pd.DataFrame, bench: str | None, per_query: pd.DataFrame):
    """(the benchmark these per-query rows were scored on, or None; a sentence saying where the texts come from
    or why there are none). Only a folder with the per-query file's fingerprint is taken: same content as
    evaluated, so a query id maps to the text the model saw."""
    name = bench or run["name"]
    fingerprints = set(per_query["fingerprint"].dropna()) if "fingerprint" in per_query.columns else set()
    paths = candidate_benchmark_paths(flat_spec(run["spec_yaml"]), all_runs, name)
    if not paths:
        return None, f"No spec records where benchmark {name!r} is (eval.benchmarks[].path), so no texts are shown."
    problems = []
    for path in paths:
        loaded = cached_benchmark(path, name)
        if isinstance(loaded, str):
            problems.append(loaded)
        elif not fingerprints or loaded.fingerprint in fingerprints:
            return loaded, f"Texts from {path}."
        else:
            problems.append(f"{path} now holds other content (fingerprint {loaded.fingerprint}, evaluated: "
                            f"{', '.join(sorted(fingerprints))})")
    return None, "No texts shown: " + "; ".join(problems) + "."


def wins_view(reg: Registry, run: dict, runs: pd.DataFrame, labels: list[str], per_query: pd.DataFrame, col: str,
              bench: str | None, texts) -> None:
    """This run against another run with per-query results, query by query, on the chosen metric and benchmark."""
    with_results = runs_with_per_query(str(reg.path))
    others = [l for l, rid in zip(labels, runs["run_id"]) if rid in with_results and rid != run["run_id"]]
    if not others:
        st.caption("No other run has per-query results to compare with.")
        return
    other_label = st.selectbox("Wins and losses against", others, key="wins_against")
    other = run_per_query(reg.get_run(runs.iloc[labels.index(other_label)]["run_id"]))
    if bench is not None and "benchmark" in other.columns:
        other = other[other["benchmark"] == bench]
    if col not in other.columns or other.empty:
        st.info(f"{other_label} has no per-query {col}" + (f" on {bench}." if bench else "."))
        return
    table = wins_losses(per_query, other, col)
    counts = table["outcome"].value_counts()
    st.markdown(f"**Wins and losses** against {other_label} by {col}" + (f" on {bench}" if bench else "")
                + f": {counts.get('win', 0)} wins, {counts.get('loss', 0)} losses, {counts.get('tie', 0)} ties")
    decided = table[table["outcome"] != "tie"].sort_values(["outcome", "qid"], kind="stable")
    shown = texts(decided).rename(columns={"this": f"this run {col}{X100}", "other": f"other run {col}{X100}"})
    st.dataframe(shown.assign(**{c: shown[c] * 100 for c in shown.columns if c.endswith(X100)}), hide_index=True)
    st.caption("Queries where the two runs differ (losses first); ties are counted but not listed. Queries "
               "without a relevant passage have no value and are left out.")


@st.cache_data(ttl=TTL_S, show_spinner=False)
def runs_with_per_query(path: str) -> set[str]:
    try:
        _, rows = Registry(path).query("SELECT DISTINCT run_id FROM artifacts WHERE kind = 'per_query'")
    except RegistryError:
        return set()
    return {r[0] for r in rows}


def main() -> None:
    st.set_page_config(page_title="koe5 leaderboard", layout="wide")
    st.title("koe5 leaderboard")
    reg = Registry(registry_path())
    try:
        runs, metrics = cached_tables(str(reg.path))
    except RegistryError as e:
        st.error(str(e))
        return
    st.caption(f"Registry: {reg.path}")
    view = st.sidebar.radio("View", VIEWS)
    all_runs = runs  # a run's base model is looked for among every run, whatever the filters hide
    runs, benches = filters(runs, metrics)
    try:
        if view == "Leaderboard":
            view_leaderboard(runs, metrics, benches, all_runs)
        elif view == "Sweeps":
            view_sweeps(reg, runs, metrics)
        elif view == "Widths":
            view_widths(reg, runs)
        elif view == "Training curves":
            view_curves(reg, runs)
        else:
            view_run(reg, runs, all_runs)
    except RegistryError as e:
        st.error(str(e))


main()
