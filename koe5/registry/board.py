"""Tables behind the leaderboard (dashboards/leaderboard.py), kept free of Streamlit so they can be tested.

The central rule: a benchmark's numbers are only comparable when they come from the same benchmark
fingerprint and evaluator version. For each benchmark the table takes the most common
(fingerprint, evaluator_version) among the shown runs as the reference; a value from anything else is
marked stale and is left out of every average.
"""

from __future__ import annotations

import json

import pandas as pd
import yaml

from koe5.registry.store import Registry

# The original KoE5 leaderboard columns: (metric, k), shown ×100 with two decimals.
TABLE_METRICS = (("ndcg", 1), ("f1", 1), ("ndcg", 3), ("f1", 3))
CURVES = ("loss", "lr", "triples_per_s", "margin")
# The C parser is ~10x faster, which matters when the main page reads 1,000 specs for their model name.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def model_of(spec_yaml: str) -> str | None:
    try:
        spec = yaml.load(spec_yaml, Loader=SAFE_LOADER) or {}
    except yaml.YAMLError:
        return None
    model = spec.get("model") if isinstance(spec, dict) else None
    return model.get("name_or_path") if isinstance(model, dict) else None


def load_runs(reg: Registry) -> pd.DataFrame:
    """One row per run with the columns the filters need (status is the effective one: crashed shows)."""
    runs = reg.list_runs()
    cols = ["run_id", "name", "kind", "status", "created_at", "tags", "sweep_id", "sweep_values", "spec_yaml", "error"]
    df = pd.DataFrame([{c: r.get(c) for c in cols} for r in runs], columns=cols)
    df["model"] = [model_of(y) for y in df["spec_yaml"]]
    df["tags"] = [t or [] for t in df["tags"]]
    return df


def load_metrics(reg: Registry) -> pd.DataFrame:
    cols = ["run_id", "benchmark", "metric", "k", "value", "fingerprint", "evaluator_version"]
    try:
        _, rows = reg.query(f"SELECT {', '.join(cols)} FROM metrics")
    except Exception:  # no registry file yet
        rows = []
    return pd.DataFrame(rows, columns=cols)


def load_train_log(reg: Registry, run_ids: list[str]) -> pd.DataFrame:
    cols = ["run_id", "step", *CURVES]
    if not run_ids:
        return pd.DataFrame(columns=cols)
    marks = ", ".join("?" * len(run_ids))
    _, rows = reg.query(f"SELECT {', '.join(cols)} FROM train_log WHERE run_id IN ({marks}) ORDER BY run_id, step",
                        run_ids)
    return pd.DataFrame(rows, columns=cols)


def runs_with_train_log(reg: Registry) -> set[str]:
    try:
        _, rows = reg.query("SELECT DISTINCT run_id FROM train_log")
    except Exception:  # no registry file yet
        return set()
    return {r[0] for r in rows}


def stale_mask(metrics: pd.DataFrame) -> pd.Series:
    """True for metric rows whose (fingerprint, evaluator_version) is not their benchmark's most common one."""
    if metrics.empty:
        return pd.Series([], dtype=bool)
    ident = metrics["fingerprint"].fillna("") + "\x00" + metrics["evaluator_version"].fillna("")
    per_run = pd.DataFrame({"benchmark": metrics["benchmark"], "run_id": metrics["run_id"], "ident": ident})
    # Count each run once per benchmark so runs with many metrics do not outvote the others.
    votes = per_run.drop_duplicates().groupby(["benchmark", "ident"]).size().reset_index(name="n")
    votes = votes.sort_values(["benchmark", "n", "ident"], ascending=[True, False, True])
    reference = votes.drop_duplicates("benchmark").set_index("benchmark")["ident"]
    return ident != metrics["benchmark"].map(reference)


def leaderboard(runs: pd.DataFrame, metrics: pd.DataFrame, benchmarks: list[str] | None = None
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table, stale): rows = runs, columns 'BENCH NDCG@1' ... plus 'Avg NDCG@1' ...; values ×100.

    `stale` has the table's shape and is True where a cell is not comparable with the rest of its column.
    An average is given only for runs with a comparable value on every chosen benchmark.
    """
    wanted = pd.DataFrame(TABLE_METRICS, columns=["metric", "k"])
    m = metrics[metrics["run_id"].isin(runs["run_id"])].merge(wanted, on=["metric", "k"])
    if benchmarks is not None:
        m = m[m["benchmark"].isin(benchmarks)]
    m = m.assign(stale=stale_mask(m).values if not m.empty else [],
                 column=m["benchmark"] + " " + m["metric"].str.upper() + "@" + m["k"].astype(str))
    benches = sorted(m["benchmark"].unique()) if benchmarks is None else [b for b in benchmarks if b in set(m["benchmark"])]
    value_cols = [f"{b} {name.upper()}@{k}" for b in benches for name, k in TABLE_METRICS]
    avg_cols = [f"Avg {name.upper()}@{k}" for name, k in TABLE_METRICS] if benches else []

    base = runs.set_index("run_id")[["name", "kind", "status", "model"]]
    values = m.pivot_table(index="run_id", columns="column", values="value", aggfunc="last") * 100
    stale = m.pivot_table(index="run_id", columns="column", values="stale", aggfunc="max")
    values = values.reindex(index=base.index, columns=value_cols)
    stale = stale.reindex(index=base.index, columns=value_cols).fillna(False).astype(bool)
    for (name, k), col in zip(TABLE_METRICS, avg_cols):
        cols = [f"{b} {name.upper()}@{k}" for b in benches]
        comparable = values[cols].notna().all(axis=1) & ~stale[cols].any(axis=1)
        values[col] = values[cols].mean(axis=1).where(comparable)
        stale[col] = False
    table = base.join(values.round(2))
    stale = pd.DataFrame(False, index=base.index, columns=list(base.columns)).join(stale)
    if avg_cols:  # best first, runs without a comparable average last
        table = table.sort_values(avg_cols[0], ascending=False, na_position="last", kind="stable")
        stale = stale.loc[table.index]
    table, stale = table.reset_index(), stale.reset_index()
    stale["run_id"] = False
    return table, stale


def sweep_points(runs: pd.DataFrame, metrics: pd.DataFrame, sweep_id: str, key: str, metric: str, k: int,
                 benchmark: str | None) -> pd.DataFrame:
    """One row per run of the sweep: the swept value of `key` and the metric (×100; mean over benchmarks if None)."""
    from koe5.spec.diff import flatten

    rows = []
    for r in runs[runs["sweep_id"] == sweep_id].itertuples():
        values = r.sweep_values if isinstance(r.sweep_values, dict) else flatten(yaml.safe_load(r.spec_yaml) or {})
        m = metrics[(metrics["run_id"] == r.run_id) & (metrics["metric"] == metric) & (metrics["k"] == k)]
        if benchmark:
            m = m[m["benchmark"] == benchmark]
        if key in values and not m.empty:
            rows.append({"run_id": r.run_id, key: values[key], f"{metric.upper()}@{k}": m["value"].mean() * 100})
    return pd.DataFrame(rows).sort_values(key) if rows else pd.DataFrame(columns=["run_id", key, f"{metric.upper()}@{k}"])


def sweep_keys(reg: Registry, runs: pd.DataFrame, sweep_id: str) -> list[str]:
    """The swept key paths: from the sweeps table, else from the runs' sweep_values."""
    for s in reg.list_sweeps():
        if s["sweep_id"] == sweep_id and s["keys"]:
            return list(s["keys"])
    keys: set[str] = set()
    for v in runs.loc[runs["sweep_id"] == sweep_id, "sweep_values"]:
        if isinstance(v, dict):
            keys |= set(v)
        elif isinstance(v, str):
            keys |= set(json.loads(v))
    return sorted(keys)
