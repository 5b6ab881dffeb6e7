"""Tables behind the leaderboard (dashboards/leaderboard.py), kept free of Streamlit so they can be tested.

The central rule: a benchmark's numbers are only comparable when they come from the same benchmark
fingerprint and evaluator version. For each benchmark the table takes the most common
(fingerprint, evaluator_version) among the shown runs as the reference; a value from anything else is
marked stale and is left out of every average.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import yaml

from koe5.registry.store import METRICS, Registry
from koe5.spec.diff import flatten

# The default leaderboard columns, (metric, k): the original KoE5 four, then NDCG@10, MTEB's main
# retrieval score. Any recorded metric@k can be picked instead (metric_options).
TABLE_METRICS = (("ndcg", 1), ("f1", 1), ("ndcg", 3), ("f1", 3), ("ndcg", 10))
CURVES = ("loss", "lr", "triples_per_s", "margin")
# The registry holds fractions in [0, 1]; every number a person reads here is x100, and its header says so.
X100 = " (x100)"
METRIC_NAMES = {"ndcg": "NDCG", "recall": "Recall", "precision": "Precision", "f1": "F1", "mrr": "MRR", "map": "MAP"}
# How much of the change against the base model the table shows (leaderboard's `deltas`).
DELTA_MODES = ("averages", "every column", "none")
# Size and cost of each run (size_cost), in the order the table shows them; blank where the registry does not
# know the value.
SIZE_COST = ("params (M)", "embedding dim", "train time (min)", "device")
# The C parser is ~10x faster, which matters when the main page reads 1,000 specs.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def metric_label(metric: str, k: int) -> str:
    """'ndcg', 10 -> 'NDCG@10' (the picker's and the column headers' spelling)."""
    return f"{METRIC_NAMES.get(metric, metric.upper())}@{k}"


def parse_metric_label(label: str) -> tuple[str, int]:
    name, k = label.rsplit("@", 1)
    lower = {v: m for m, v in METRIC_NAMES.items()}
    return lower.get(name, name.lower()), int(k)


def metric_options(metrics: pd.DataFrame) -> list[str]:
    """Every recorded metric@k as a label, by metric (koe5's order) then k as a number."""
    order = {m: i for i, m in enumerate(METRICS)}
    pairs = sorted(set(zip(metrics["metric"], metrics["k"].astype(int))),
                   key=lambda p: (order.get(p[0], len(order)), p[0], p[1]))
    return [metric_label(m, k) for m, k in pairs]


def flat_spec(spec_yaml: str | None) -> dict:
    """The resolved spec as {key path: value} ('train.lr': 2e-05); {} for text that is not a YAML mapping."""
    try:
        spec = yaml.load(spec_yaml or "", Loader=SAFE_LOADER)
    except yaml.YAMLError:
        return {}
    return flatten(spec) if isinstance(spec, dict) else {}


def model_of(spec_yaml: str) -> str | None:
    return flat_spec(spec_yaml).get("model.name_or_path")


def load_runs(reg: Registry) -> pd.DataFrame:
    """One row per run with the columns the filters need (status is the effective one: crashed shows), and
    `spec`, the flattened spec, parsed once here for the model name and the spec columns; then the
    SIZE_COST columns (size_cost)."""
    runs = reg.list_runs()
    cols = ["run_id", "name", "kind", "status", "created_at", "tags", "sweep_id", "sweep_values", "spec_yaml", "error",
            "devices"]
    df = pd.DataFrame([{c: r.get(c) for c in cols} for r in runs], columns=cols)
    df["spec"] = [flat_spec(y) for y in df["spec_yaml"]]
    df["model"] = [s.get("model.name_or_path") for s in df["spec"]]
    df["tags"] = [t or [] for t in df["tags"]]
    return df.join(size_cost(reg, df), on="run_id")


# ---- size and cost ---------------------------------------------------------------------------------

def safetensors_params(model_dir: Path) -> int | None:
    """Parameters of the weights in `model_dir`'s *.safetensors files (one file or shards), counted from the
    files' JSON headers, so no weight is read; None without such files or with an unreadable one
    (a pytorch_model.bin cannot be counted without loading it)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    try:
        for file in files:
            with open(file, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return total


def embedding_dim(model_dir: Path) -> int | None:
    """The sentence embedding's size: the pooling layer's word_embedding_dimension (koe5's export and
    sentence-transformers write it), else the backbone's hidden_size (d_model for T5-like configs)."""
    for file, keys in ((model_dir / "1_Pooling" / "config.json", ("word_embedding_dimension",)),
                       (model_dir / "config.json", ("hidden_size", "d_model"))):
        try:
            config = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        for key in keys:
            if isinstance(config.get(key), int):
                return config[key]
    return None


def model_dirs(reg: Registry, runs: pd.DataFrame) -> dict[str, Path]:
    """{run_id: the directory holding the run's model}, for runs where one exists on this machine: the
    exported model (artifact `model`), else `model/` in the run directory, else the spec's
    model.name_or_path when it is an absolute local directory (a baseline evaluates that model; a
    fine-tune keeps its base model's shape). A hub id is not looked up: that would need the network."""
    try:
        _, rows = reg.query("SELECT run_id, kind, path FROM artifacts WHERE kind IN ('model', 'run_dir') "
                            "ORDER BY created_at")
    except Exception:  # no registry file yet
        rows = []
    found: dict[str, dict[str, Path]] = {}
    for run_id, kind, path in rows:  # the newest artifact of each kind wins
        found.setdefault(run_id, {})[kind] = Path(path) / "model" if kind == "run_dir" else Path(path)
    out = {}
    for run_id, model in zip(runs["run_id"], runs["model"]):
        candidates = [found.get(run_id, {}).get("model"), found.get(run_id, {}).get("run_dir")]
        if isinstance(model, str) and model.startswith("/"):
            candidates.append(Path(model))
        directory = next((c for c in candidates if c is not None and c.is_dir()), None)
        if directory is not None:
            out[run_id] = directory
    return out


def device_summary(devices) -> str:
    """A run's recorded devices in a few words: ["H100", "H100"] -> "2× H100"; "" when none is recorded."""
    if not isinstance(devices, list) or not devices:
        return ""
    return ", ".join(name if n == 1 else f"{n}× {name}" for name, n in Counter(map(str, devices)).items())


def size_cost(reg: Registry, runs: pd.DataFrame) -> pd.DataFrame:
    """The SIZE_COST columns, index run_id: parameters (millions) and embedding dimension from the run's
    model directory (model_dirs), training time from the train log's last elapsed_s (the training loop
    only: no evaluation, no queueing; blank for a run that did not train), and the recorded devices."""
    out = pd.DataFrame(index=pd.Index(runs["run_id"], name="run_id"))
    params, dims = {}, {}
    for run_id, directory in model_dirs(reg, runs).items():
        params[run_id], dims[run_id] = safetensors_params(directory), embedding_dim(directory)
    try:
        _, rows = reg.query("SELECT run_id, max(elapsed_s) FROM train_log GROUP BY run_id")
    except Exception:  # no registry file yet
        rows = []
    elapsed = {run_id: s for run_id, s in rows if s is not None}
    out[SIZE_COST[0]] = pd.array([None if params.get(r) is None else round(params[r] / 1e6, 2) for r in out.index],
                                 dtype="Float64")
    out[SIZE_COST[1]] = pd.array([dims.get(r) for r in out.index], dtype="Int64")
    out[SIZE_COST[2]] = pd.array([None if r not in elapsed else round(elapsed[r] / 60, 2) for r in out.index],
                                 dtype="Float64")
    out[SIZE_COST[3]] = [device_summary(d) for d in runs["devices"]]
    return out


def spec_key_options(runs: pd.DataFrame) -> list[str]:
    """Every key path found in the runs' specs, sorted."""
    return sorted({k for s in runs["spec"] for k in s})


def spec_columns(runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One column per key path with each run's value (blank where its spec lacks the key), index run_id.

    A column stays numeric when every value is a number, so it sorts as one; anything else (strings,
    lists, mixed) is shown as text, because a table column must hold one type.
    """
    out = pd.DataFrame(index=runs["run_id"])
    for key in keys:
        values = [s.get(key) for s in runs["spec"]]
        present = [v for v in values if v is not None]
        if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
            out[key] = pd.array(values, dtype="Int64")  # stays 64, not 64.0, beside blanks
        elif present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
            out[key] = pd.array(values, dtype="Float64")
        else:
            out[key] = [None if v is None else str(v) for v in values]
    return out


def load_metrics(reg: Registry) -> pd.DataFrame:
    """Every run's metrics at the full embedding width: what every table, delta and sweep compares. The
    values at truncated widths (eval.dims) are another model size; load_width_metrics reads them."""
    cols = ["run_id", "benchmark", "metric", "k", "value", "fingerprint", "evaluator_version"]
    try:
        _, rows = reg.query(f"SELECT {', '.join(cols)} FROM metrics WHERE dim IS NULL")
    except Exception:  # no registry file yet
        rows = []
    return pd.DataFrame(rows, columns=cols)


def load_width_metrics(reg: Registry) -> pd.DataFrame:
    """The metric rows of the runs evaluated at truncated widths (eval.dims), full-width rows included,
    with `width`: the truncated width, or the model's full width (`model_dim`) on a full-width row
    (NaN where the registry does not know it)."""
    cols = ["run_id", "benchmark", "metric", "k", "value", "fingerprint", "evaluator_version", "dim", "model_dim"]
    try:
        _, rows = reg.query(f"SELECT {', '.join(cols)} FROM metrics WHERE run_id IN "
                            "(SELECT run_id FROM metrics WHERE dim IS NOT NULL)")
    except Exception:  # no registry file yet
        rows = []
    df = pd.DataFrame(rows, columns=cols)
    df["width"] = df["dim"].fillna(df["model_dim"]).astype("Float64")
    return df


def width_points(runs: pd.DataFrame, width_metrics: pd.DataFrame, metric: str, k: int,
                 benchmark: str | None = None) -> pd.DataFrame:
    """The data of the quality-against-width plot: one row per (run, width) for the shown runs evaluated at
    more than one width, columns run_id, name, width, full (the full width's point) and
    'METRIC@k (x100)' (the mean over the benchmarks, or `benchmark`'s). A width lacking one of the run's
    benchmarks is left out, so a point never averages fewer benchmarks than its neighbours."""
    label = metric_label(metric, k) + X100
    out_cols = ["run_id", "name", "width", "full", label]
    m = width_metrics[(width_metrics["metric"] == metric) & (width_metrics["k"] == k)
                      & width_metrics["run_id"].isin(runs["run_id"]) & width_metrics["width"].notna()]
    if benchmark:
        m = m[m["benchmark"] == benchmark]
    if m.empty:
        return pd.DataFrame(columns=out_cols)
    n_bench = m.groupby("run_id")["benchmark"].nunique().rename("n_bench")
    points = m.groupby(["run_id", "width"], as_index=False).agg(
        value=("value", "mean"), benchmarks=("benchmark", "nunique"), full=("dim", lambda d: bool(d.isna().all())))
    points = points.join(n_bench, on="run_id")
    points = points[points["benchmarks"] == points["n_bench"]]
    points = points[points.groupby("run_id")["width"].transform("nunique") > 1]  # a curve needs two widths
    names = runs.set_index("run_id")["name"]
    points = points.assign(name=points["run_id"].map(names), width=points["width"].astype(int),
                           **{label: points["value"] * 100})
    return points.sort_values(["run_id", "width"], kind="stable")[out_cols].reset_index(drop=True)


def load_train_log(reg: Registry, run_ids: list[str]) -> pd.DataFrame:
    """Every logged row of these runs, one per (run, step), oldest step first.

    The registry keeps each line of the run's train_log.jsonl as it is (a repeated step: the later line).
    The trainer writes a line at the first step, every train.log_every steps and at the last step.
    """
    cols = ["run_id", "step", *CURVES]
    if not run_ids:
        return pd.DataFrame(columns=cols)
    marks = ", ".join("?" * len(run_ids))
    _, rows = reg.query(f"SELECT {', '.join(cols)} FROM train_log WHERE run_id IN ({marks}) ORDER BY run_id, step",
                        run_ids)
    return pd.DataFrame(rows, columns=cols)


def eval_curve(rows: list[dict], metric: str) -> pd.DataFrame:
    """A run's evaluations during training (get_run's `eval_log`) as the curve of one metric (NAME@K):
    columns step, benchmark and the value x100, by step."""
    name, k = parse_metric_label(metric)
    df = pd.DataFrame(rows, columns=["step", "benchmark", "metric", "k", "value", "seconds"])
    df = df[(df["metric"] == name) & (df["k"] == k)].sort_values(["benchmark", "step"], kind="stable")
    return pd.DataFrame({"step": df["step"], "benchmark": df["benchmark"], metric + X100: df["value"] * 100})


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


def column_name(bench: str, metric: str, k: int) -> str:
    """'ko-strategyqa NDCG@1 (x100)'; bench 'Avg' names the average over the chosen benchmarks."""
    return f"{bench} {metric_label(metric, k)}{X100}"


def base_runs(runs: pd.DataFrame, all_runs: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Each run's base model per benchmark, as columns run_id, benchmark, base_id.

    The base is a finished `baseline` run (an evaluation of the untrained model) of the same
    model.name_or_path on the same benchmark with the same fingerprint and evaluator version, so the two
    numbers are comparable; the newest one if there are several. Baselines themselves get none: the only
    candidates would be themselves or another evaluation of the same untrained model. Bases are looked
    for in `all_runs`, so a filter that hides the baselines keeps the deltas.
    """
    ident = ["benchmark", "fingerprint", "evaluator_version"]
    evaluated = metrics[["run_id", *ident]].fillna("").drop_duplicates()
    trained = runs.loc[runs["kind"] != "baseline", ["run_id", "model"]].dropna(subset=["model"])
    bases = all_runs.loc[(all_runs["kind"] == "baseline") & (all_runs["status"] == "finished"),
                         ["run_id", "model", "created_at"]].dropna(subset=["model"])
    bases = bases.rename(columns={"run_id": "base_id"})
    pairs = trained.merge(evaluated, on="run_id").merge(
        bases.merge(evaluated.rename(columns={"run_id": "base_id"}), on="base_id"), on=["model", *ident])
    pairs = pairs.sort_values("created_at", kind="stable").drop_duplicates(["run_id", "benchmark"], keep="last")
    return pairs[["run_id", "benchmark", "base_id"]]


def leaderboard(runs: pd.DataFrame, metrics: pd.DataFrame, benchmarks: list[str] | None = None,
                metric_keys=TABLE_METRICS, spec_keys=(), all_runs: pd.DataFrame | None = None,
                deltas: str = "averages") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table, stale): one row per run, best first.

    Columns: name; 'Avg NDCG@1 (x100)' ... for every (metric, k) of `metric_keys`, then for every benchmark
    'BENCH NDCG@1 (x100)' ...; the chosen `spec_keys` (spec_columns); the SIZE_COST columns when `runs`
    has them; kind, status, model; run_id last. Metric values x100 with two decimals. The averages come
    first so they stay in sight in a narrow window. `deltas` ('averages', 'every column' or 'none', see
    DELTA_MODES) adds 'Δ <column>': the run minus its base model (base_runs, looked for in `all_runs`,
    default `runs`), x100; the averages' Δ after the last average, a benchmark column's Δ right after it.

    `stale` has the table's shape and is True where a cell is not comparable with the rest of its column
    (a Δ cell is stale with its value). An average, and the Δ of an average, is given only for runs with
    a comparable value (and a base) on every chosen benchmark.
    """
    metric_keys = [(name, int(k)) for name, k in metric_keys]
    wanted = pd.DataFrame(metric_keys, columns=["metric", "k"])
    chosen = metrics.astype({"k": int}).merge(wanted, on=["metric", "k"])
    if benchmarks is not None:
        chosen = chosen[chosen["benchmark"].isin(benchmarks)]
    m = chosen[chosen["run_id"].isin(runs["run_id"])]
    m = m.assign(stale=stale_mask(m).values if not m.empty else [],
                 column=[column_name(b, name, k) for b, name, k in zip(m["benchmark"], m["metric"], m["k"])])
    benches = sorted(m["benchmark"].unique()) if benchmarks is None else [b for b in benchmarks if b in set(m["benchmark"])]
    per_bench = {(name, k): [column_name(b, name, k) for b in benches] for name, k in metric_keys}
    value_cols = [column_name(b, name, k) for b in benches for name, k in metric_keys]
    avg_cols = {(name, k): column_name("Avg", name, k) for name, k in metric_keys} if benches else {}

    runs_by_id = runs.set_index("run_id")
    # The size and cost columns when the runs carry them (load_runs adds them).
    about = runs_by_id[[c for c in (*SIZE_COST, "kind", "status", "model") if c in runs_by_id.columns]]
    spec = spec_columns(runs, list(spec_keys))
    values = m.pivot_table(index="run_id", columns="column", values="value", aggfunc="last") * 100
    stale = m.pivot_table(index="run_id", columns="column", values="stale", aggfunc="max")
    values = values.reindex(index=runs_by_id.index, columns=value_cols)
    stale = stale.reindex(index=runs_by_id.index, columns=value_cols).fillna(False).astype(bool)
    for key, col in avg_cols.items():
        cols = per_bench[key]
        comparable = values[cols].notna().all(axis=1) & ~stale[cols].any(axis=1)
        values[col] = values[cols].mean(axis=1).where(comparable)
        stale[col] = False

    # The averages before the per-benchmark columns: they are what a reader compares first, and a wide table
    # (5 metrics x several benchmarks) pushed them out of sight at 1500 px.
    order = list(avg_cols.values()) + value_cols
    if deltas != "none" and order:
        change = _changes(m, chosen, base_runs(runs, runs if all_runs is None else all_runs, chosen))
        change = change.reindex(index=runs_by_id.index, columns=value_cols)
        for key, col in avg_cols.items():
            cols = per_bench[key]
            change[col] = change[cols].mean(axis=1).where(values[col].notna() & change[cols].notna().all(axis=1))
        shown = list(avg_cols.values()) if deltas == "averages" else order
        for col in shown:
            values["Δ " + col] = change[col]
            stale["Δ " + col] = stale[col]
        # The averages' Δ after all the averages, so every average fits beside the name in a 1500 px window;
        # each per-benchmark Δ right after its column.
        averages = list(avg_cols.values())
        order = averages + ["Δ " + c for c in averages if c in shown] + [
            c for col in value_cols for c in ([col, "Δ " + col] if col in shown else [col])]

    # name | averages | per benchmark | spec keys | size and cost | kind, status, model | run_id
    table = runs_by_id[["name"]].join(values[order].round(2)).join(spec).join(about)
    cells, stale = stale, pd.DataFrame(False, index=table.index, columns=table.columns)
    stale[order] = cells[order].astype(bool)
    if avg_cols:  # best first, runs without a comparable average last
        table = table.sort_values(next(iter(avg_cols.values())), ascending=False, na_position="last", kind="stable")
        stale = stale.loc[table.index]
    table, stale = table.reset_index(), stale.reset_index()
    table, stale = table[[*table.columns[1:], "run_id"]], stale[[*stale.columns[1:], "run_id"]]
    stale["run_id"] = False
    return table, stale


def _changes(m: pd.DataFrame, chosen: pd.DataFrame, bases: pd.DataFrame) -> pd.DataFrame:
    """Run minus base model (x100) per run and leaderboard column; m: the shown runs' metric rows with
    their `column`, chosen: every run's rows (the bases' values), bases: base_runs."""
    base_values = chosen.rename(columns={"run_id": "base_id", "value": "base_value"})[
        ["base_id", "benchmark", "metric", "k", "base_value"]]
    d = m.merge(bases, on=["run_id", "benchmark"]).merge(base_values, on=["base_id", "benchmark", "metric", "k"])
    if d.empty:
        return pd.DataFrame()
    d = d.assign(change=(d["value"] - d["base_value"]) * 100)
    return d.pivot_table(index="run_id", columns="column", values="change", aggfunc="last")


def _metric_x100(metrics: pd.DataFrame, run_id: str, metric: str, k: int, benchmarks: list[str]) -> float | None:
    """A run's metric x100, the mean over `benchmarks`; None unless it has all of them."""
    m = metrics[(metrics["run_id"] == run_id) & (metrics["metric"] == metric) & (metrics["k"] == k)
                & metrics["benchmark"].isin(benchmarks)]
    return m["value"].mean() * 100 if set(m["benchmark"]) == set(benchmarks) and benchmarks else None


def sweep_points(runs: pd.DataFrame, metrics: pd.DataFrame, sweep_id: str, key: str, metric: str, k: int,
                 benchmark: str | None) -> pd.DataFrame:
    """One row per trained run of the sweep: the swept value of `key` and the metric (x100; mean over
    benchmarks if None). The sweep's baselines are not points: their x is whatever their spec says, so
    they would jump the line; sweep_baselines gives them as reference values."""
    label = metric_label(metric, k) + X100
    rows = []
    members = runs[(runs["sweep_id"] == sweep_id) & (runs["kind"] != "baseline")]
    for r in members.itertuples():
        values = r.sweep_values if isinstance(r.sweep_values, dict) else r.spec
        m = metrics[(metrics["run_id"] == r.run_id) & (metrics["metric"] == metric) & (metrics["k"] == k)]
        if benchmark:
            m = m[m["benchmark"] == benchmark]
        if key in values and not m.empty:
            rows.append({"run_id": r.run_id, "name": r.name, key: values[key], label: m["value"].mean() * 100})
    return pd.DataFrame(rows).sort_values(key) if rows else pd.DataFrame(columns=["run_id", "name", key, label])


def sweep_baselines(runs: pd.DataFrame, metrics: pd.DataFrame, sweep_id: str, metric: str, k: int,
                    benchmark: str | None) -> pd.DataFrame:
    """The untrained model as reference values for a sweep plot: run_id, name, 'METRIC@k (x100)'.

    koe5-run records the base model's evaluation with the sweep's id; a sweep without one falls back to
    the newest finished baseline of the model its runs trained (when they all trained one model). The
    value averages the same benchmarks as the sweep's points, and a baseline lacking one is left out.
    """
    label = metric_label(metric, k) + X100
    members = runs[runs["sweep_id"] == sweep_id]
    found = members[members["kind"] == "baseline"]
    models = set(members.loc[members["kind"] != "baseline", "model"].dropna())
    if found.empty and len(models) == 1:
        same = runs[(runs["kind"] == "baseline") & (runs["status"] == "finished") & (runs["model"] == models.pop())]
        found = same.sort_values("created_at", kind="stable").tail(1)
    trained = metrics[metrics["run_id"].isin(members.loc[members["kind"] != "baseline", "run_id"])
                      & (metrics["metric"] == metric) & (metrics["k"] == k)]
    benches = [benchmark] if benchmark else sorted(trained["benchmark"].unique())
    rows = [{"run_id": r.run_id, "name": r.name, label: _metric_x100(metrics, r.run_id, metric, k, benches)}
            for r in found.itertuples()]
    rows = [r for r in rows if r[label] is not None]
    return pd.DataFrame(rows, columns=["run_id", "name", label])


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


# ---- the run page: query texts, wins and losses ---------------------------------------------------

def benchmark_paths(spec: dict, name: str) -> list[str]:
    """The paths a flattened spec gives the benchmark `name` (eval.benchmarks[i].path); a baseline's spec
    (its evaluation description) names benchmarks without paths, so it gives none."""
    out = []
    for key, value in spec.items():
        found = re.fullmatch(r"eval\.benchmarks\[(\d+)\]\.name", key)
        path = spec.get(f"eval.benchmarks[{found.group(1)}].path") if found and value == name else None
        if isinstance(path, str) and path:
            out.append(path)
    return out


def candidate_benchmark_paths(run_spec: dict, runs: pd.DataFrame, name: str) -> list[str]:
    """Where the files of benchmark `name` may be: the run's own spec first, then any other run's (a baseline
    records no path, but the runs trained beside it evaluated the same benchmark). The caller keeps only
    a folder whose content fingerprint matches the per-query file's, so a same-named other benchmark or
    an edited one is never taken for it."""
    paths = benchmark_paths(run_spec, name)
    for spec in runs["spec"]:
        paths += [p for p in benchmark_paths(spec, name) if p not in paths]
    return paths


def with_texts(per_query: pd.DataFrame, bench) -> pd.DataFrame:
    """`per_query` with the query's text, its relevant passage's text (the highest-graded one, with how
    many more are relevant) and the text of the passage retrieved first (when the file records it) from
    `bench` (a koe5.eval.benchmark.Benchmark), right after `qid`."""
    queries = dict(zip(bench.query_ids, bench.query_texts))
    corpus = dict(zip(bench.corpus_ids, bench.corpus_texts))

    def relevant(qid: str) -> str | None:
        judged = sorted(((g, d) for d, g in bench.qrels.get(qid, {}).items() if g > 0), reverse=True)
        if not judged:
            return None
        text = corpus.get(judged[0][1], f"({judged[0][1]}: not in the corpus)")
        return text + (f" (+{len(judged) - 1} more relevant)" if len(judged) > 1 else "")

    qids = per_query["qid"].astype(str)
    out = per_query.copy()
    at = list(out.columns).index("qid") + 1
    out.insert(at, "query", [queries.get(q) for q in qids])
    out.insert(at + 1, "relevant passage", [relevant(q) for q in qids])
    if "top_document" in out.columns:  # per-query files written since the rank-1 document is recorded
        out.insert(at + 2, "retrieved first", [None if not isinstance(d, str) else corpus.get(d, f"({d}: not in the corpus)")
                                               for d in out.pop("top_document")])
    return out


def wins_losses(this: pd.DataFrame, other: pd.DataFrame, col: str) -> pd.DataFrame:
    """Per query that both runs scored on `col` (one benchmark's per-query rows each): qid, this run's and the
    other run's value, and the outcome for this run: win, loss or tie. Excluded queries (no relevant
    passage, no value) are left out, as koe5.registry.commands.per_query_wins leaves them out."""
    both = this[["qid", col]].assign(qid=this["qid"].astype(str)).merge(
        other[["qid", col]].assign(qid=other["qid"].astype(str)), on="qid", suffixes=("_this", "_other")).dropna()
    a, b = both[f"{col}_this"], both[f"{col}_other"]
    return pd.DataFrame({"qid": both["qid"], "this": a, "other": b,
                         "outcome": ["win" if x > y else "loss" if x < y else "tie" for x, y in zip(a, b)]})
