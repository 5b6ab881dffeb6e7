"""koe5 leaderboard: `streamlit run dashboards/leaderboard.py [-- --registry PATH]`.

The registry path comes from --registry, else $KOE5_REGISTRY, else registry/koe5.duckdb. Every query
opens a short read-only connection (koe5.registry), so a running training job can always write; query
results are cached for a few seconds only, never the connection.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd
import streamlit as st

from koe5.registry import Registry, RegistryError
from koe5.registry.board import (CURVES, TABLE_METRICS, leaderboard, load_metrics, load_runs, load_train_log,
                                 runs_with_train_log, sweep_keys, sweep_points)
from koe5.registry.commands import per_query_metric_columns, run_per_query
from koe5.spec.diff import diff_yaml

TTL_S = 5
VIEWS = ("Leaderboard", "Sweeps", "Training curves", "Run")


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


def view_leaderboard(runs: pd.DataFrame, metrics: pd.DataFrame, benches: list[str]) -> None:
    st.subheader("Leaderboard")
    st.caption("Per benchmark NDCG@1, F1@1, NDCG@3, F1@3 (×100) and their average over the chosen benchmarks. "
               "Bold green = best in column. † = stale: a different benchmark fingerprint or evaluator version "
               "than the rest of the column; stale values are never averaged.")
    table, stale = leaderboard(runs, metrics, benches)
    if table.empty:
        st.info("No runs match the filters.")
        return
    numeric = [c for c in table.columns if c not in ("run_id", "name", "kind", "status", "model")]
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
    styled = shown.style.apply(style, axis=0).format({c: "{:.2f}" for c in numeric}, na_rep="–")
    st.dataframe(styled, hide_index=True, width="stretch")
    avg = f"Avg {TABLE_METRICS[0][0].upper()}@{TABLE_METRICS[0][1]}"
    if avg in table and table[avg].notna().any():
        top = table.loc[table[avg].idxmax()]
        st.markdown(f"Best by {avg}: **{top['name']}** (`{top['run_id']}`, {top['kind']}) — {top[avg]:.2f}")
    st.caption(f"{len(table)} runs: " + ", ".join(f"{n} {k}" for k, n in table["kind"].value_counts().items()))


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
    options = [f"{m.upper()}@{k}" for m, k in sorted(set(zip(metrics["metric"], metrics["k"])))] or ["NDCG@1"]
    metric = c2.selectbox("Metric", options, index=options.index("NDCG@1") if "NDCG@1" in options else 0)
    bench = c3.selectbox("Benchmark", ["(mean)"] + sorted(metrics["benchmark"].unique()))
    name, k = metric.lower().split("@")
    points = sweep_points(runs, metrics, sweep, key, name, int(k), None if bench == "(mean)" else bench)
    if points.empty:
        st.info("No run of this sweep has that metric yet.")
        return
    if pd.api.types.is_numeric_dtype(points[key]):
        st.line_chart(points, x=key, y=metric)
    else:
        st.bar_chart(points, x=key, y=metric)
    st.dataframe(points, hide_index=True)


def view_curves(reg: Registry, runs: pd.DataFrame) -> None:
    st.subheader("Training curves")
    logged = runs_with_train_log(reg)
    trained = runs[runs["run_id"].isin(logged)]
    labels = {f"{r.name} ({r.run_id})": r.run_id for r in trained.itertuples()}
    chosen = st.multiselect("Runs", list(labels), default=list(labels)[:3])
    log = load_train_log(reg, [labels[c] for c in chosen])
    if log.empty:
        st.info("No training log recorded for these runs.")
        return
    for col in CURVES:
        st.markdown(f"**{col}**")
        st.line_chart(log.pivot_table(index="step", columns="run_id", values=col))


def view_run(reg: Registry, runs: pd.DataFrame) -> None:
    st.subheader("Run")
    if runs.empty:
        st.info("No runs.")
        return
    labels = [f"{r.name} ({r.run_id})" for r in runs.itertuples()]
    label = st.selectbox("Run", labels, key="run_page")
    run = reg.get_run(runs.iloc[labels.index(label)]["run_id"])
    st.markdown(f"**{run['name']}** `{run['run_id']}` — {run['kind']}, **{run['status']}**"
                + (f" — {run['error']}" if run.get("error") else ""))
    provenance = {k: run.get(k) for k in ("spec_hash", "git_commit", "git_dirty", "versions", "host", "devices",
                                          "world_size", "data_mix", "created_at", "started_at", "finished_at")}
    st.json({k: (str(v) if hasattr(v, "isoformat") else v) for k, v in provenance.items()}, expanded=False)
    st.code(run["spec_yaml"], language="yaml")

    others = [l for l in labels if l != label]
    if others:
        other = st.selectbox("Diff against", others, key="diff_against")
        other_run = reg.get_run(runs.iloc[labels.index(other)]["run_id"])
        diffs = diff_yaml(other_run["spec_yaml"], run["spec_yaml"])
        st.dataframe(pd.DataFrame([(k, str(a), str(b)) for k, a, b in diffs],
                                  columns=["key", other_run["run_id"], run["run_id"]]), hide_index=True)

    if run["metrics"]:
        st.dataframe(pd.DataFrame(run["metrics"]), hide_index=True)
    per_query = run_per_query(run)
    if per_query is None:
        st.caption("No per-query results recorded for this run.")
        return
    cols = per_query_metric_columns(per_query)
    if not cols:
        return
    c1, c2 = st.columns(2)
    col = c1.selectbox("Misses by", cols, key="miss_metric")
    if "benchmark" in per_query.columns:
        bench = c2.selectbox("Benchmark", sorted(per_query["benchmark"].unique()), key="miss_benchmark")
        per_query = per_query[per_query["benchmark"] == bench]
    misses = per_query[per_query[col] == 0]
    st.markdown(f"**Queries missed** ({len(misses)} of {per_query[col].notna().sum()} with {col} = 0)")
    st.dataframe(misses, hide_index=True)


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
    runs, benches = filters(runs, metrics)
    try:
        if view == "Leaderboard":
            view_leaderboard(runs, metrics, benches)
        elif view == "Sweeps":
            view_sweeps(reg, runs, metrics)
        elif view == "Training curves":
            view_curves(reg, runs)
        else:
            view_run(reg, runs)
    except RegistryError as e:
        st.error(str(e))


main()
