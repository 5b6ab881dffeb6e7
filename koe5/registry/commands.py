"""`koe5 ls | show | compare | diff | best | export | sql | rm`: query the run registry from the shell
(`export RUN --push-to-hub` uploads a run's model, koe5/registry/publish.py).

Every command reads through short read-only connections (rm writes under the write lock), names a run by
id, unique id prefix or suffix, run name or `latest` (store.RUN_REF_HELP), prints errors as one paragraph on
stderr and returns exit status 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

import duckdb
import yaml

from koe5.registry.connect import RegistryError
from koe5.registry.store import RUN_REF_HELP, STATUSES, Registry, parse_metric
from koe5.spec.diff import ABSENT, diff_yaml

# Statement kinds `koe5 sql` accepts (SHOW, DESCRIBE, SUMMARIZE and FROM-first queries parse as SELECT).
READ_STATEMENTS = {"SELECT", "EXPLAIN"}


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """Plain aligned text table; None prints as '-'."""
    cells = [[("-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def x100(value: float | None, sign: str = "") -> str | None:
    """A metric (a fraction in the registry and in --json) as the tables print it: x100, two decimals, the
    scale koe5-run, koe5 eval and the leaderboard use too; every header says "(x100)"."""
    return None if value is None else f"{100 * value:{sign}.2f}"


def _cli_errors(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the errors a user can cause into one message on stderr and exit status 2."""
    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args) or 0
        except RegistryError as e:
            print(f"koe5 {args.command}: {e}", file=sys.stderr)
        except duckdb.Error as e:
            print(f"koe5 {args.command}: the query failed: {e}", file=sys.stderr)
        except BrokenPipeError:
            raise  # the reader of stdout left (`koe5 ls | head`): koe5.cli.main ends quietly
        except OSError as e:
            print(f"koe5 {args.command}: {e}", file=sys.stderr)
        return 2
    return wrapper


def _registry(args: argparse.Namespace) -> Registry:
    return Registry(args.registry)


def metric_table(runs: list[dict]) -> dict[tuple[str, str], list[float | None]]:
    """{(benchmark, 'ndcg@10'): [value per run]} over the union of the runs' metrics."""
    table: dict[tuple[str, str], list[float | None]] = {}
    for i, run in enumerate(runs):
        for m in run["metrics"]:
            key = (m["benchmark"], f"{m['metric']}@{m['k']}")
            table.setdefault(key, [None] * len(runs))[i] = m["value"]
    return dict(sorted(table.items(), key=lambda item: (item[0][0], *metric_order(item[0][1]))))


def metric_order(name: str) -> tuple[str, int]:
    """Sort key of 'ndcg@10': by metric, then by cut-off as a number (f1@1, f1@3, f1@10, not f1@1, f1@10)."""
    metric, _, k = name.partition("@")
    return metric, int(k) if k.isdigit() else 0


def per_query_label(column: str) -> str:
    """How a per-query column reads next to the metric table: the per-query F1 (`f1q@k` in the files, the
    harmonic mean of each query's own precision and recall) is F1@k computed per query."""
    metric, _, k = column.partition("@")
    return f"f1@{k} (per query)" if metric == "f1q" else column


def load_per_query(path: str | Path):
    """A per-query results file (parquet or JSONL with a `qid` column) as a pandas DataFrame."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise RegistryError(f"The per-query results file {path} is recorded as an artifact but is missing.")
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_json(path, lines=True)
    if "qid" not in df.columns:
        raise RegistryError(f"{path}: per-query results need a `qid` column (found {', '.join(df.columns)}).")
    return df


def run_per_query(run: dict):
    """All of a run's per-query artifacts (one per benchmark) in one DataFrame, or None if it saved none."""
    import pandas as pd

    frames = [load_per_query(a["path"]) for a in run["artifacts"] if a["kind"] == "per_query"]
    return pd.concat(frames, ignore_index=True) if frames else None


def per_query_metric_columns(df) -> list[str]:
    """The per-query metric columns ('ndcg@3', 'f1@1', ...), not ranks, flags or ids."""
    return [c for c in df.columns if re.fullmatch(r"[a-z0-9_]+@\d+", str(c)) and df[c].dtype.kind in "fiu"]


def per_query_wins(run_a: dict, run_b: dict) -> dict[str, dict[str, int]] | None:
    """For each metric column both runs saved per query: queries where b beats a, loses, ties."""
    da, db = run_per_query(run_a), run_per_query(run_b)
    if da is None or db is None:
        return None
    keys = ["qid"] + (["benchmark"] if "benchmark" in da.columns and "benchmark" in db.columns else [])
    joined = da.merge(db, on=keys, suffixes=("_a", "_b"))
    out = {}
    for col in per_query_metric_columns(da):
        if col not in db.columns:
            continue
        # Queries without a value on either side (excluded: no relevant document) are not counted.
        both = joined[[f"{col}_a", f"{col}_b"]].dropna()
        a, b = both[f"{col}_a"], both[f"{col}_b"]
        out[col] = {"wins": int((b > a).sum()), "losses": int((b < a).sum()), "ties": int((b == a).sum())}
    return out


# ---- commands ------------------------------------------------------------------------------------

@_cli_errors
def cmd_ls(args: argparse.Namespace) -> int:
    if args.sort:
        parse_metric(args.sort)
    runs = _registry(args).list_runs(status=args.status, tag=args.tag, name_glob=args.name, sweep=args.sweep,
                                     sort_metric=args.sort)
    fields = ("run_id", "name", "kind", "status", "created_at", "tags", "sweep_id", "error",
              "headline_metric", "headline", "headline_mean")
    if args.json:
        _print_json([{f: r[f] for f in fields} for r in runs])
        return 0
    if not runs:
        print("no runs")
        return 0
    metric = runs[0]["headline_metric"]
    rows = [[r["run_id"], r["name"], r["kind"], r["status"], f"{r['created_at']:%Y-%m-%d %H:%M}",
             ",".join(r["tags"] or []), x100(r["headline_mean"]),
             " ".join(f"{b}={x100(v)}" for b, v in sorted(r["headline"].items()))] for r in runs]
    print(_table(["run_id", "name", "kind", "status", "created", "tags", f"{metric} mean (x100)",
                  "per benchmark (x100)"], rows))
    return 0


def training_notes(summary: dict | None) -> list[str]:
    """What a run's train_summary says about its evaluations during training, one sentence each: their
    share of the training loop's time, the step exported by train.keep_best and an early stop."""
    if not summary or summary.get("eval_seconds") is None:
        return []
    notes = []
    seconds, evaluating = summary.get("seconds") or 0.0, summary["eval_seconds"]
    if evaluating:
        share = f" ({100 * evaluating / seconds:.1f}%)" if seconds else ""
        notes.append(f"evaluation during training took {evaluating:.1f} s of the {seconds:.1f} s training "
                     f"loop{share}")
    best = summary.get("best") or {}
    if best.get("step") is not None:
        notes.append(f"exported step {best['step']} of {summary.get('steps')}, the best by {best['metric']} on "
                     f"{best['benchmark']}: {100 * best['value']:.2f} (x100)")
    if summary.get("stopped_early_at") is not None:
        notes.append(f"stopped early after step {summary['stopped_early_at']} of {summary.get('total_steps')}: "
                     f"no better {best.get('metric')} for train.keep_best.patience evaluations")
    return notes


def curve_metric(rows: list[dict], summary: dict | None) -> str:
    """The metric a curve of the evaluations during training shows first: the one train.keep_best watched,
    else ndcg@10, else NDCG at the largest cut-off evaluated."""
    best = (summary or {}).get("best") or {}
    present = {(r["metric"], r["k"]) for r in rows}
    if best.get("metric"):
        return best["metric"]
    if ("ndcg", 10) in present or not present:
        return "ndcg@10"
    return f"ndcg@{max(k for m, k in present if m == 'ndcg')}"


def eval_log_table(rows: list[dict], metric: str) -> str:
    """The evaluations during training as a table: one row per step, one column per benchmark, `metric`
    (NAME@K) x100."""
    name, k = parse_metric(metric)
    chosen = [r for r in rows if r["metric"] == name and r["k"] == k]
    benchmarks = sorted({r["benchmark"] for r in chosen})
    by_step: dict[int, dict[str, float]] = {}
    for r in chosen:
        by_step.setdefault(r["step"], {})[r["benchmark"]] = r["value"]
    return _table(["step"] + [f"{b} {metric} (x100)" for b in benchmarks],
                  [[step] + [x100(values.get(b)) for b in benchmarks] for step, values in sorted(by_step.items())])


def width_table(full: list[dict], truncated: list[dict]) -> str:
    """One row per (benchmark, metric@k), one column per width x100, narrowest first and the full width last
    (headed by its number when the registry knows it), so quality reads against size along a row."""
    widths = sorted({m["dim"] for m in truncated})
    model_dims = {m["model_dim"] for m in truncated if m.get("model_dim")}
    full_label = f"{model_dims.pop()} (full)" if len(model_dims) == 1 else "full"
    cells: dict[tuple[str, str], dict] = {}
    for m in truncated:
        cells.setdefault((m["benchmark"], f"{m['metric']}@{m['k']}"), {})[m["dim"]] = m["value"]
    for m in full:
        key = (m["benchmark"], f"{m['metric']}@{m['k']}")
        if key in cells:  # only the metrics that were evaluated at the narrower widths
            cells[key][None] = m["value"]
    keys = sorted(cells, key=lambda key: (key[0], *metric_order(key[1])))
    return _table(["benchmark", "metric (x100)"] + [str(w) for w in widths] + [full_label],
                  [[b, name] + [x100(cells[(b, name)].get(w)) for w in [*widths, None]] for b, name in keys])


@_cli_errors
def cmd_show(args: argparse.Namespace) -> int:
    run = _registry(args).get_run(args.run)
    if args.json:
        _print_json(run)
        return 0
    skip = {"spec_yaml", "metrics", "dim_metrics", "artifacts", "eval_log"}
    for key, value in run.items():
        if key not in skip and value not in (None, [], {}):
            print(f"{key:15} {json.dumps(value, default=str, ensure_ascii=False) if isinstance(value, (dict, list)) else value}")
    if run["metrics"]:  # the results before the long spec
        print("\nmetrics:")
        metrics = sorted(run["metrics"], key=lambda m: (m["benchmark"], m["metric"], m["k"]))
        print(_table(["benchmark", "metric", "value (x100)", "fingerprint", "evaluator"],
                     [[m["benchmark"], f"{m['metric']}@{m['k']}", x100(m["value"]), m["fingerprint"],
                       m["evaluator_version"]] for m in metrics]))
    if run["dim_metrics"]:
        print("\nmetrics per embedding width (eval.dims; the table above is the full width):")
        print(width_table(run["metrics"], run["dim_metrics"]))
    notes = training_notes(run.get("train_summary"))
    if run["eval_log"] or notes:
        print("\nduring training:")
        for note in notes:
            print("  " + note)
        if run["eval_log"]:
            print(eval_log_table(run["eval_log"], curve_metric(run["eval_log"], run.get("train_summary"))))
    print("\nspec:\n" + "\n".join("  " + line for line in run["spec_yaml"].rstrip().splitlines()))
    if run["artifacts"]:
        print("\nartifacts:")
        print(_table(["kind", "path"], [[a["kind"], a["path"]] for a in run["artifacts"]]))
    return 0


@_cli_errors
def cmd_compare(args: argparse.Namespace) -> int:
    reg = _registry(args)
    runs = [reg.get_run(p) for p in args.runs]
    table = metric_table(runs)
    # Deltas are against the first run given, the usual "baseline first" reading.
    rows = [{"benchmark": b, "metric": m, "values": vals,
             "deltas": [None if v is None or vals[0] is None else v - vals[0] for v in vals[1:]]}
            for (b, m), vals in table.items()]
    wins = {r["run_id"]: per_query_wins(runs[0], r) for r in runs[1:]}
    if args.json:
        _print_json({"runs": [r["run_id"] for r in runs], "metrics": rows, "per_query_vs_first": wins})
        return 0
    ids = [r["run_id"] for r in runs]
    header = ["benchmark", "metric (x100)"] + ids + [f"Δ {i}" for i in ids[1:]]
    print(_table(header, [[r["benchmark"], r["metric"]] + [x100(v) for v in r["values"]]
                          + [x100(d, "+") for d in r["deltas"]] for r in rows]))
    for rid, w in wins.items():
        if w:
            print(f"\nper query, {rid} vs {ids[0]}:")
            for col in sorted(w, key=metric_order):
                c = w[col]
                print(f"  {per_query_label(col)}: {c['wins']} wins, {c['losses']} losses, {c['ties']} ties")
    return 0


@_cli_errors
def cmd_diff(args: argparse.Namespace) -> int:
    reg = _registry(args)
    a, b = reg.get_run(args.run_a), reg.get_run(args.run_b)
    try:
        diffs = diff_yaml(a["spec_yaml"], b["spec_yaml"])
    except yaml.YAMLError as e:
        raise RegistryError(f"A stored spec is not valid YAML ({e}); the registry entry is damaged.") from None
    if args.json:
        _print_json([{"key": k, a["run_id"]: va, b["run_id"]: vb} for k, va, vb in diffs])
        return 0
    if not diffs:
        print("specs are identical")
        return 0
    # JSON spelling, so 3e-05 is not rounded away.
    rows = [[k] + [v if v is ABSENT else json.dumps(v, ensure_ascii=False, default=str) for v in (va, vb)]
            for k, va, vb in diffs]
    print(_table(["key", a["run_id"], b["run_id"]], rows))
    return 0


@_cli_errors
def cmd_best(args: argparse.Namespace) -> int:
    import pandas as pd

    from koe5.registry.board import stale_mask

    metric, k = parse_metric(args.metric)
    cols, rows = _registry(args).query(
        "SELECT m.run_id, r.name, r.kind, m.benchmark, m.value, m.fingerprint, m.evaluator_version "
        # The full width only: a value at a truncated width (eval.dims) is another model size, not a rival.
        "FROM metrics m JOIN runs r USING (run_id) WHERE m.metric = ? AND m.k = ? AND m.dim IS NULL", [metric, k])
    df = pd.DataFrame(rows, columns=cols)
    # Values from another benchmark fingerprint or evaluator version are not comparable: leave them out,
    # and rank only runs that have a comparable value on every benchmark considered.
    df["stale"] = stale_mask(df).to_numpy(dtype=bool) if len(df) else []
    if args.benchmark:
        df = df[df["benchmark"] == args.benchmark]
    n_bench = df["benchmark"].nunique()
    ok = df[~df["stale"]].groupby(["run_id", "name", "kind"], as_index=False).agg(
        value=("value", "mean"), benchmarks=("benchmark", "nunique"))
    ok = ok[ok["benchmarks"] == n_bench].sort_values(["value", "run_id"], ascending=[False, True])
    skipped = df["run_id"].nunique() - len(ok)
    if ok.empty:
        where = f" on benchmark {args.benchmark!r}" if args.benchmark else ""
        raise RegistryError(f"No run has a comparable {metric}@{k}{where} recorded.")
    found = ok.head(args.top).to_dict("records")
    if args.json:
        _print_json(found if args.top > 1 else found[0])
        return 0
    label = f"{metric}@{k} (x100)" + (f" on {args.benchmark}" if args.benchmark else ", mean over benchmarks")
    print(_table(["run_id", "name", "kind", label, "benchmarks"],
                 [[f["run_id"], f["name"], f["kind"], x100(f["value"]), f["benchmarks"]] for f in found]))
    if skipped:
        print(f"({skipped} runs left out: stale benchmark fingerprint/evaluator version or missing benchmarks)")
    return 0


EXPORT_SQL = ("SELECT r.run_id, r.name, r.kind, r.status, r.spec_hash, r.created_at, r.finished_at, r.tags, "
              "r.sweep_id, r.git_commit, m.benchmark, m.metric, m.k, m.value, m.fingerprint, m.evaluator_version, "
              "m.dim, m.model_dim FROM runs r LEFT JOIN metrics m USING (run_id) "
              "ORDER BY r.run_id, m.benchmark, m.metric, m.k, m.dim NULLS FIRST")


@_cli_errors
def cmd_export(args: argparse.Namespace) -> int:
    """Two exports: the registry's runs and metrics to a file (--format, -o), or one run's model to the
    Hugging Face hub (RUN --push-to-hub NAME)."""
    if args.push_to_hub or args.run:
        return push_run_model(args)
    if args.dry_run or args.private:
        raise RegistryError("--dry-run and --private go with RUN --push-to-hub NAME.")
    if not (args.format and args.output):
        raise RegistryError("Give --format and -o PATH to export the registry's runs and metrics to a file, or "
                            "RUN --push-to-hub NAME to upload a run's model to the Hugging Face hub.")
    import pandas as pd

    cols, rows = _registry(args).query(EXPORT_SQL)
    df = pd.DataFrame(rows, columns=cols)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "csv":
        df.to_csv(out, index=False)
    elif args.format == "parquet":
        df.to_parquet(out, index=False)
    else:
        df.to_json(out, orient="records", date_format="iso", force_ascii=False, indent=2)
    print(f"wrote {len(df)} rows (one per run and metric) to {out}")
    return 0


def push_run_model(args: argparse.Namespace) -> int:
    """`koe5 export RUN --push-to-hub NAME [--dry-run] [--private]`."""
    from koe5.registry import publish

    if not (args.run and args.push_to_hub):
        raise RegistryError("Uploading a run's model takes both RUN and --push-to-hub NAME (e.g. "
                            "`koe5 export latest --push-to-hub me/koe5-model`).")
    if args.format or args.output:
        raise RegistryError("--format and -o export the registry to a file; they do not go with --push-to-hub.")
    run = _registry(args).get_run(args.run)
    model_dir = publish.run_model_dir(run)
    files = publish.model_files(model_dir)
    total = sum(size for _, size in files)
    if args.dry_run:
        print(f"dry run: would upload {len(files)} files ({publish.human_size(total)}) from {model_dir} "
              f"to the Hugging Face model repo {args.push_to_hub}{' (private)' if args.private else ''}:")
        print(_table(["file", "bytes"], [[rel, size] for rel, size in files]))
        skipped = publish.left_out_files(model_dir)
        if skipped:
            print(f"left out (hidden files or training state): {', '.join(skipped)}")
        return 0
    url = publish.push(model_dir, args.push_to_hub, files, private=args.private,
                       message=f"koe5 run {run['run_id']} ({run['name']})")
    print(f"pushed {len(files)} files ({publish.human_size(total)}) of run {run['run_id']} to {args.push_to_hub}: {url}")
    return 0


def check_read_only(sql: str) -> None:
    """Refuse anything but one SELECT/EXPLAIN statement before it reaches the database."""
    try:
        statements = duckdb.connect(":memory:").extract_statements(sql)
    except duckdb.Error as e:
        raise RegistryError(f"Cannot parse the SQL: {e}") from None
    if len(statements) != 1:
        raise RegistryError(f"`koe5 sql` runs exactly one statement; got {len(statements)}.")
    kind = statements[0].type.name
    if kind not in READ_STATEMENTS:
        raise RegistryError(f"`koe5 sql` only reads: {kind} statements are refused. Use SELECT (or WITH, SHOW, "
                            f"DESCRIBE); runs are removed with `koe5 rm`.")


@_cli_errors
def cmd_sql(args: argparse.Namespace) -> int:
    check_read_only(args.query)
    cols, rows = _registry(args).query(args.query)
    if args.json:
        _print_json([dict(zip(cols, r)) for r in rows])
    else:
        print(_table(cols, [list(r) for r in rows]))
    return 0


@_cli_errors
def cmd_rm(args: argparse.Namespace) -> int:
    reg = _registry(args)
    run = reg.get_run(args.run)
    if not args.yes:
        prompt = f"Delete run {run['run_id']} ({run['name']}, {run['status']}) with its metrics and logs? [y/N] "
        try:
            answer = input(prompt)
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted")
            return 1
    reg.delete_run(run["run_id"])
    print(f"deleted {run['run_id']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", metavar="PATH", help="registry file (default: $KOE5_REGISTRY or registry/koe5.duckdb)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = subparsers.add_parser("ls", parents=[common, as_json], help="list runs with status and headline metrics")
    p.add_argument("--status", choices=STATUSES + ("crashed",))
    p.add_argument("--tag")
    p.add_argument("--name", metavar="GLOB", help="run name glob, e.g. 'e5-*'")
    p.add_argument("--sweep", metavar="SWEEP_ID")
    p.add_argument("--sort", metavar="METRIC@K", help="sort by mean over benchmarks, e.g. ndcg@10")
    p.set_defaults(func=cmd_ls)

    p = subparsers.add_parser("show", parents=[common, as_json], help="one run: spec, provenance, metrics, artifacts")
    p.add_argument("run", help=RUN_REF_HELP)
    p.set_defaults(func=cmd_show)

    p = subparsers.add_parser("compare", parents=[common, as_json], help="metrics side by side, deltas vs the first run")
    p.add_argument("runs", nargs="+", metavar="RUN", help=RUN_REF_HELP)
    p.set_defaults(func=cmd_compare)

    p = subparsers.add_parser("diff", parents=[common, as_json], help="spec key paths that differ between two runs")
    p.add_argument("run_a", metavar="RUN", help=RUN_REF_HELP)
    p.add_argument("run_b", metavar="RUN")
    p.set_defaults(func=cmd_diff)

    p = subparsers.add_parser("best", parents=[common, as_json], help="best run by a metric")
    p.add_argument("--metric", required=True, metavar="METRIC@K")
    p.add_argument("--benchmark")
    p.add_argument("--top", type=int, default=1, help="show the N best")
    p.set_defaults(func=cmd_best)

    p = subparsers.add_parser(
        "export", parents=[common], help="export runs and metrics to a file, or a run's model to the hub",
        description="`koe5 export --format F -o PATH` writes every run and metric to a file. "
                    "`koe5 export RUN --push-to-hub NAME` uploads the run's exported model directory "
                    "(sentence-transformers + transformers) to the Hugging Face hub, with the token of "
                    "`hf auth login` or $HF_TOKEN; --dry-run lists the files and the repo id instead.")
    p.add_argument("run", nargs="?", metavar="RUN", help="with --push-to-hub: the run whose model to upload; "
                   + RUN_REF_HELP)
    p.add_argument("--format", choices=("csv", "parquet", "json"))
    p.add_argument("-o", "--output", metavar="PATH")
    p.add_argument("--push-to-hub", metavar="NAME", help="hub repo id to upload RUN's model to, e.g. me/koe5-base")
    p.add_argument("--dry-run", action="store_true", help="with --push-to-hub: list the files and sizes that "
                   "would be uploaded and the repo id; no network")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("sql", parents=[common, as_json], help="run a read-only SQL query on the registry")
    p.add_argument("query", metavar="SQL")
    p.set_defaults(func=cmd_sql)

    p = subparsers.add_parser("rm", parents=[common], help="delete a run (asks first)")
    p.add_argument("run", help=RUN_REF_HELP)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_rm)
