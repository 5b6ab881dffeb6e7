"""The Registry: record runs, metrics, training curves and artifacts; read them back.

Every method opens its own short connection (see connect.py) and closes it before returning, so no
process ever holds the database between calls. Only rank 0 of a training job should write.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import secrets
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterable

from koe5.registry.connect import (RegistryError, default_registry_path, read_connection, utcnow,
                                   write_connection)

STATUSES = ("queued", "running", "finished", "failed", "killed")
TERMINAL = ("finished", "failed", "killed")
KINDS = ("train", "baseline", "eval")
METRICS = ("ndcg", "recall", "precision", "f1", "mrr", "map")
HEADLINE = "ndcg@10"  # shown by `koe5 ls` when no --sort metric is given

# Columns of train_log with their own column; any other key of a log line goes to `extra`.
TRAIN_LOG_COLUMNS = ("step", "loss", "lr", "grad_norm", "triples_per_s", "tokens_per_s", "margin",
                     "false_neg_frac", "elapsed_s")
JSON_COLUMNS = ("tags", "sweep_values", "versions", "devices", "ds_config", "data_mix", "train_summary")


def heartbeat_timeout_s() -> float:
    return float(os.environ.get("KOE5_HEARTBEAT_TIMEOUT", "60"))


def new_id(now: datetime | None = None) -> str:
    """UTC time to the second + 6 random hex digits: sorts by creation time, unique in practice."""
    return f"{(now or utcnow()):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def parse_metric(text: str) -> tuple[str, int]:
    """'ndcg@10' -> ('ndcg', 10), with an error that lists the valid forms."""
    name, _, k = text.strip().lower().partition("@")
    if name not in METRICS or not k.isdigit() or int(k) < 1:
        raise RegistryError(f"Bad metric {text!r}: write NAME@K with NAME one of {', '.join(METRICS)} "
                            f"and K a positive integer, e.g. ndcg@10.")
    return name, int(k)


def effective_status(status: str, heartbeat_at: datetime | None, now: datetime | None = None,
                     timeout_s: float | None = None) -> str:
    """`crashed` for a running run whose heartbeat is older than the timeout; the stored status otherwise."""
    if status != "running":
        return status
    timeout_s = heartbeat_timeout_s() if timeout_s is None else timeout_s
    if heartbeat_at is None or (now or utcnow()) - heartbeat_at > timedelta(seconds=timeout_s):
        return "crashed"
    return status


RUN_REF_HELP = ("a run: its id, a unique prefix or suffix of the id, a run name (its newest run) or `latest` "
                "(the newest koe5-run training run)")


def resolve_run_ref(ref: str, runs: list[dict], where) -> str:
    """The run id `ref` names among `runs` (dicts with run_id, name and kind, oldest created first). Tried in order,
    the first kind of match wins: the exact id, `latest`, a run name (newest run of that name; a sweep's
    members and a spec run twice share one), then a unique id prefix, then a unique id suffix (the random
    part `koe5-run` prints last)."""
    ids = [r["run_id"] for r in runs]
    if ref in ids:
        return ref
    if ref == "latest":
        trained = [r["run_id"] for r in runs if r["kind"] == "train"] or ids
        if trained:
            return trained[-1]
        raise RegistryError(f"`latest`: there are no runs in {where} yet.")
    named = [r["run_id"] for r in runs if r["name"] == ref]
    if named:
        return named[-1]
    for how, matches in (("prefix", [i for i in ids if i.startswith(ref)]),
                         ("suffix", [i for i in ids if ref and i.endswith(ref)])):
        if len(matches) == 1:
            return matches[0]
        if matches:
            shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
            raise RegistryError(f"Run id {how} {ref!r} is ambiguous ({len(matches)} runs: {shown}); "
                                "give more characters.")
    raise RegistryError(f"No run id starts or ends with {ref!r}, and no run is named so, in {where}. "
                        "`koe5 ls` lists the runs.")


def _rows(con, sql: str, params: Iterable[Any] = ()) -> list[dict]:
    cur = con.execute(sql, list(params))
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def _decode(run: dict) -> dict:
    for c in JSON_COLUMNS:
        if c in run and isinstance(run[c], str):
            run[c] = json.loads(run[c])
    run["recorded_status"] = run["status"]
    run["status"] = effective_status(run["status"], run.get("heartbeat_at") or run.get("started_at"))
    return run


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


class Registry:
    """Handle on one registry file; cheap to create, holds no connection."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_registry_path()

    # ---- writing -------------------------------------------------------------------------------

    def create_run(self, name: str, spec_hash: str, spec_yaml: str, kind: str = "train", status: str = "queued",
                   tags: Iterable[str] = (), sweep_id: str | None = None, output_dir: str | None = None,
                   provenance: dict | None = None, ds_config: dict | None = None,
                   sweep_values: dict | None = None) -> str:
        if kind not in KINDS:
            raise RegistryError(f"Unknown run kind {kind!r}: use one of {', '.join(KINDS)}.")
        self._check_status(status)
        prov = provenance or {}
        now = utcnow()
        with write_connection(self.path) as con:
            run_id = new_id(now)
            while con.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchall():
                run_id = new_id(now)
            con.execute(
                "INSERT INTO runs (run_id, name, kind, spec_hash, spec_yaml, status, created_at, started_at, "
                "heartbeat_at, tags, sweep_id, sweep_values, output_dir, git_commit, git_dirty, versions, host, "
                "devices, world_size, ds_config) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [run_id, name, kind, spec_hash, spec_yaml, status, now,
                 now if status == "running" else None, now,
                 _json(list(tags)), sweep_id, _json(sweep_values), output_dir,
                 prov.get("git_commit"), prov.get("git_dirty"), _json(prov.get("versions")), prov.get("host"),
                 _json(prov.get("devices")), prov.get("world_size"), _json(ds_config)])
        return run_id

    def set_status(self, run_id: str, status: str, error: str | None = None) -> None:
        self._check_status(status)
        now = utcnow()
        with write_connection(self.path) as con:
            self._require(con, run_id)
            con.execute(
                # (Re)starting a run clears the error of the attempt it resumes.
                "UPDATE runs SET status = ?, "
                "error = CASE WHEN ? = 'running' THEN NULL ELSE coalesce(?, error) END, heartbeat_at = ?, "
                "started_at = CASE WHEN ? = 'running' THEN coalesce(started_at, ?) ELSE started_at END, "
                "finished_at = CASE WHEN ? IN ('finished', 'failed', 'killed') THEN ? "
                "WHEN ? = 'running' THEN NULL ELSE finished_at END "
                "WHERE run_id = ?",
                [status, status, error, now, status, now, status, now, status, run_id])

    def heartbeat(self, run_id: str) -> None:
        with write_connection(self.path) as con:
            self._require(con, run_id)
            con.execute("UPDATE runs SET heartbeat_at = ? WHERE run_id = ?", [utcnow(), run_id])

    def add_metrics(self, run_id: str, benchmark: str, values: dict[tuple[str, int], float],
                    fingerprint: str | None = None, evaluator_version: str | None = None,
                    dim: int | None = None, model_dim: int | None = None) -> None:
        """Record metric values; re-recording (run, benchmark, metric, k, dim) replaces the old value.

        `dim` None: the model's full embedding; a number: the embeddings truncated to that width (Matryoshka
        evaluation). `model_dim`: the full width, so the two can be placed on one axis."""
        if dim is not None and (int(dim) < 1 or (model_dim is not None and int(dim) >= int(model_dim))):
            raise RegistryError(f"Width {dim} on {benchmark!r}: a truncated width is positive and below the "
                                f"model's full width {model_dim} (record the full width with dim None).")
        rows = []
        for (metric, k), value in values.items():
            if metric not in METRICS:
                raise RegistryError(f"Unknown metric {metric!r} for benchmark {benchmark!r}: use one of "
                                    f"{', '.join(METRICS)}.")
            value = float(value)
            if not (0.0 <= value <= 1.0) or math.isnan(value):
                raise RegistryError(f"Metric {metric}@{k} on {benchmark!r} is {value}: metric values are "
                                    f"fractions in [0, 1].")
            rows.append([run_id, benchmark, metric, int(k), value, fingerprint, evaluator_version, utcnow(),
                         None if dim is None else int(dim), None if model_dim is None else int(model_dim)])
        with write_connection(self.path) as con:
            self._require(con, run_id)
            con.execute("BEGIN TRANSACTION")
            for r in rows:
                con.execute("DELETE FROM metrics WHERE run_id = ? AND benchmark = ? AND metric = ? AND k = ? "
                            "AND dim IS NOT DISTINCT FROM ?", r[:4] + r[8:9])
            if rows:
                con.executemany("INSERT INTO metrics (run_id, benchmark, metric, k, value, fingerprint, "
                                "evaluator_version, recorded_at, dim, model_dim) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                rows)
            con.execute("COMMIT")

    def add_artifact(self, run_id: str, kind: str, path: str) -> None:
        with write_connection(self.path) as con:
            self._require(con, run_id)
            con.execute("INSERT INTO artifacts VALUES (?, ?, ?, ?)", [run_id, kind, str(path), utcnow()])

    def set_data_mix(self, run_id: str, data_mix: dict) -> None:
        with write_connection(self.path) as con:
            self._require(con, run_id)
            con.execute("UPDATE runs SET data_mix = ? WHERE run_id = ?", [_json(data_mix), run_id])

    def fold_train_log(self, run_id: str, jsonl_path: str | Path) -> int:
        """Insert the log lines whose step is not recorded yet; returns how many rows were added.

        Training appends one JSON object per line and may die mid-line, so an unparsable *last* line is
        skipped (it is folded on the next call once complete). If a step appears twice (a resumed run
        rewrote it), the later line wins.
        """
        jsonl_path = Path(jsonl_path)
        if not jsonl_path.exists():
            return 0
        lines = jsonl_path.read_text(encoding="utf-8").split("\n")
        last = max((i for i, line in enumerate(lines, start=1) if line.strip()), default=0)
        by_step: dict[int, dict] = {}
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                if i == last:
                    continue  # torn last line of a file still being written
                raise RegistryError(f"{jsonl_path}:{i}: not valid JSON. Each line of a train log must be one "
                                    f"JSON object; fix or delete that line and fold again.") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("step"), int):
                raise RegistryError(f"{jsonl_path}:{i}: each train-log line needs an integer \"step\" key.")
            by_step[obj["step"]] = obj
        with write_connection(self.path) as con:
            self._require(con, run_id)
            done = {r[0] for r in con.execute("SELECT step FROM train_log WHERE run_id = ?", [run_id]).fetchall()}
            rows = []
            for step in sorted(set(by_step) - done):
                obj = by_step[step]
                extra = {k: v for k, v in obj.items() if k not in TRAIN_LOG_COLUMNS}
                rows.append([run_id] + [obj.get(c) for c in TRAIN_LOG_COLUMNS] + [_json(extra) if extra else None])
            if rows:
                con.executemany(f"INSERT INTO train_log VALUES ({', '.join('?' * (len(TRAIN_LOG_COLUMNS) + 2))})",
                                rows)
        return len(rows)

    def drop_train_log_after(self, run_id: str, step: int) -> None:
        """Forget logged steps (training log and evaluations during training) after `step`: a run resuming
        from that checkpoint logs them again."""
        with write_connection(self.path) as con:
            self._require(con, run_id)
            for table in ("train_log", "eval_log"):
                con.execute(f"DELETE FROM {table} WHERE run_id = ? AND step > ?", [run_id, step])

    def fold_eval_log(self, run_id: str, jsonl_path: str | Path) -> int:
        """Insert the evaluations during training (eval_log.jsonl: one line per step and benchmark) not
        recorded yet; returns how many lines were added. A torn last line waits for the next call, as in
        `fold_train_log`; a (step, benchmark) written twice keeps its later line."""
        jsonl_path = Path(jsonl_path)
        if not jsonl_path.exists():
            return 0
        lines = [(i, line) for i, line in enumerate(jsonl_path.read_text(encoding="utf-8").split("\n"), start=1)
                 if line.strip()]
        rows: dict[tuple[int, str], dict] = {}
        for i, line in lines:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                if i == lines[-1][0]:
                    continue
                raise RegistryError(f"{jsonl_path}:{i}: not valid JSON. Each line of an eval log must be one "
                                    f"JSON object; fix or delete that line and fold again.") from None
            if not (isinstance(obj, dict) and isinstance(obj.get("step"), int) and isinstance(obj.get("benchmark"), str)
                    and isinstance(obj.get("metrics"), dict)):
                raise RegistryError(f"{jsonl_path}:{i}: each eval-log line needs an integer \"step\", a "
                                    f"\"benchmark\" name and a \"metrics\" object.")
            rows[(obj["step"], obj["benchmark"])] = obj
        with write_connection(self.path) as con:
            self._require(con, run_id)
            done = set(con.execute("SELECT DISTINCT step, benchmark FROM eval_log WHERE run_id = ?",
                                   [run_id]).fetchall())
            new = []
            for key in sorted(set(rows) - done):
                obj = rows[key]
                for name, value in obj["metrics"].items():
                    metric, k = parse_metric(name)
                    new.append([run_id, key[0], key[1], metric, k, float(value), obj.get("seconds")])
            if new:
                con.executemany("INSERT INTO eval_log VALUES (?, ?, ?, ?, ?, ?, ?)", new)
        return len(set(rows) - done)

    def set_train_summary(self, run_id: str, summary: dict) -> None:
        with write_connection(self.path) as con:
            self._require(con, run_id)
            con.execute("UPDATE runs SET train_summary = ? WHERE run_id = ?", [_json(summary), run_id])

    def create_sweep(self, name: str, spec_path: str | Path | None, keys: list[str]) -> str:
        now = utcnow()
        with write_connection(self.path) as con:
            sweep_id = new_id(now)
            con.execute("INSERT INTO sweeps VALUES (?, ?, ?, ?, ?)",
                        [sweep_id, name, None if spec_path is None else str(spec_path), _json(list(keys)), now])
        return sweep_id

    def delete_run(self, run_id: str) -> None:
        with write_connection(self.path) as con:
            self._require(con, run_id)
            con.execute("BEGIN TRANSACTION")
            for table in ("metrics", "train_log", "eval_log", "artifacts", "runs"):
                con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
            con.execute("COMMIT")

    # ---- reading -------------------------------------------------------------------------------

    def find_runs(self, spec_hash: str, status: str | None = None) -> list[dict]:
        """Runs with this spec hash (oldest first), optionally only those with this effective status."""
        with read_connection(self.path) as con:
            if con is None:
                return []
            runs = [_decode(r) for r in _rows(con, "SELECT * FROM runs WHERE spec_hash = ? ORDER BY created_at, run_id",
                                              [spec_hash])]
        return [r for r in runs if status is None or r["status"] == status]

    def get_run(self, ref: str) -> dict:
        """The run `ref` names (see RUN_REF_HELP), with its metrics and artifacts.

        JSON columns come back decoded; `status` is the effective status (`crashed` for a running run with a
        stale heartbeat) and `recorded_status` the stored one; `metrics`, `artifacts` and `eval_log` (the
        evaluations during training, by step) are lists of dicts. `metrics` holds the full-width embedding's
        values only (what every comparison means); `dim_metrics` the values at truncated widths (eval.dims),
        each with its `dim`, narrowest first.
        """
        with read_connection(self.path) as con:
            runs = [] if con is None else _rows(con, "SELECT run_id, name, kind FROM runs ORDER BY created_at, run_id")
            run_id = resolve_run_ref(ref, runs, self.path)
            run = _decode(_rows(con, "SELECT * FROM runs WHERE run_id = ?", [run_id])[0])
            run["metrics"] = _rows(con, "SELECT benchmark, metric, k, value, fingerprint, evaluator_version "
                                        "FROM metrics WHERE run_id = ? AND dim IS NULL "
                                        "ORDER BY benchmark, metric, k", [run_id])
            run["dim_metrics"] = _rows(con, "SELECT dim, model_dim, benchmark, metric, k, value, fingerprint, "
                                            "evaluator_version FROM metrics WHERE run_id = ? AND dim IS NOT NULL "
                                            "ORDER BY dim, benchmark, metric, k", [run_id])
            run["artifacts"] = _rows(con, "SELECT kind, path, created_at FROM artifacts WHERE run_id = ? "
                                          "ORDER BY created_at", [run_id])
            run["eval_log"] = _rows(con, "SELECT step, benchmark, metric, k, value, seconds FROM eval_log "
                                         "WHERE run_id = ? ORDER BY step, benchmark, metric, k", [run_id])
            return run

    def list_runs(self, status: str | None = None, tag: str | None = None, name_glob: str | None = None,
                  sweep: str | None = None, sort_metric: str | None = None) -> list[dict]:
        """Runs (newest first, or best first by `sort_metric`, e.g. 'ndcg@10'), each with headline metrics.

        Each run gets `headline_metric` (sort_metric or ndcg@10), `headline` {benchmark: value} and
        `headline_mean` (mean over its benchmarks, None if it has none).
        """
        metric, k = parse_metric(sort_metric or HEADLINE)
        with read_connection(self.path) as con:
            if con is None:
                return []
            # A sweep id, like a run id, may be given by a unique prefix; '' matches every run.
            runs = _rows(con, "SELECT * FROM runs WHERE ? = '' OR starts_with(sweep_id, ?) ORDER BY created_at DESC, run_id DESC",
                         [sweep or "", sweep or ""])
            scores = _rows(con, "SELECT run_id, benchmark, value FROM metrics WHERE metric = ? AND k = ? "
                                "AND dim IS NULL", [metric, k])  # the full width: a run's headline
        per_run: dict[str, dict[str, float]] = {}
        for s in scores:
            per_run.setdefault(s["run_id"], {})[s["benchmark"]] = s["value"]
        out = []
        for run in map(_decode, runs):
            if status and run["status"] != status:
                continue
            if tag and tag not in (run["tags"] or []):
                continue
            if name_glob and not fnmatch.fnmatchcase(run["name"], name_glob):
                continue
            run["headline_metric"] = f"{metric}@{k}"
            run["headline"] = per_run.get(run["run_id"], {})
            vals = list(run["headline"].values())
            run["headline_mean"] = sum(vals) / len(vals) if vals else None
            out.append(run)
        if sort_metric:
            out.sort(key=lambda r: (r["headline_mean"] is None, -(r["headline_mean"] or 0.0)))
        return out

    def list_sweeps(self) -> list[dict]:
        with read_connection(self.path) as con:
            rows = [] if con is None else _rows(con, "SELECT * FROM sweeps ORDER BY sweep_id DESC")
        for r in rows:
            r["keys"] = json.loads(r["keys"]) if r["keys"] else []
        return rows

    def query(self, sql: str, params: Iterable[Any] = ()) -> tuple[list[str], list[tuple]]:
        """Run one statement on a read-only connection; returns (column names, rows)."""
        with read_connection(self.path) as con:
            if con is None:
                raise RegistryError(f"The registry {self.path} does not exist yet: no run has been recorded.")
            cur = con.execute(sql, list(params))
            if cur.description is None:
                return [], []
            return [d[0] for d in cur.description], cur.fetchall()

    # ---- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _check_status(status: str) -> None:
        if status not in STATUSES:
            raise RegistryError(f"Unknown run status {status!r}: use one of {', '.join(STATUSES)}.")

    @staticmethod
    def _require(con, run_id: str) -> None:
        if not con.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchall():
            raise RegistryError(f"No run {run_id!r} in the registry; create_run must come first.")
