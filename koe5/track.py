"""Reporting a run to the experiment trackers of `train.report_to`: TensorBoard, MLflow, Weights & Biases,
each through its own library (optional dependencies: `pip install koe5[trackers]`).

The orchestrator and the training ranks are different processes, so one tracker run is opened by the
first of them and reopened by the others; what identifies it is kept in `<run_dir>/trackers.json`.

    check_installed(report_to)            checks.py, before anything is recorded: one TrackerError naming
                                          train.report_to and the pip command for every missing library
    start(spec, spec_hash, run_dir)       orchestrator, before the ranks start (again on resume): opens the
                                          tracker runs and sends the flattened resolved spec and its hash
    training(spec, spec_hash, run_dir, rank) -> reporter
                                          trainer: `reporter.log(row)` sends a train_log.jsonl row's scalars
                                          at its step, `reporter.close()`; only rank 0 reports
    finish(spec, run_dir, results, model_dir, status)
                                          orchestrator, after evaluation: the metrics at the last step, the
                                          exported model as an artifact (MLflow, W&B), the run's end

Where the output goes: TensorBoard `<run_dir>/tensorboard/` (each process its own event file); MLflow
`$MLFLOW_TRACKING_URI`, else a local SQLite store `<output_dir>/mlruns/mlflow.db` with artifacts beside
it, one MLflow experiment per koe5 experiment name; W&B the project `$WANDB_PROJECT` or the experiment
name (W&B's own settings: WANDB_MODE=offline, WANDB_ENTITY, ...).

Names: training scalars are `train/<name>` (loss, lr, grad_norm, margin, false_neg_frac, triples_per_s,
tokens_per_s), evaluation metrics `eval/<benchmark>/<metric>@<k>` as fractions, like the registry. MLflow
allows no `@` or `[` in a name, so there they read `eval/<benchmark>/<metric>_at_<k>` and spec keys
`data.sources.0.path`.

Once the check has passed, reporting never stops a run: a tracker that fails (a server down, a full
disk) is named in one warning and left out for the rest of that process.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Iterable

# tracker -> (modules it needs, what to pip install)
LIBRARIES = {
    "tensorboard": (("tensorboard", "torch.utils.tensorboard"), "tensorboard"),
    "mlflow": (("mlflow",), "mlflow"),
    "wandb": (("wandb",), "wandb"),
}
# MLflow's local SQLite store (used without MLFLOW_TRACKING_URI) needs these; the `mlflow` package has them,
# `mlflow-skinny` does not.
MLFLOW_LOCAL_STORE = ("sqlalchemy", "alembic")
SCALARS = ("loss", "lr", "grad_norm", "margin", "false_neg_frac", "triples_per_s", "tokens_per_s")
STATE_FILE = "trackers.json"


class TrackerError(ValueError):
    """A tracker of train.report_to cannot be used here; the message names the key and the pip command."""


def enabled(spec) -> list[str]:
    return list(dict.fromkeys(spec.train.report_to))


def check_installed(report_to: Iterable[str]) -> None:
    """Every tracker's library must import, before a run is recorded or a rank starts: a missing one is
    one line naming train.report_to and the pip command, never a traceback halfway through a run."""
    missing: dict[str, list[str]] = {}
    for name in dict.fromkeys(report_to):
        modules, package = LIBRARIES[name]
        if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
            modules = modules + MLFLOW_LOCAL_STORE
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError:
                missing.setdefault(name, []).append(package)
                break
    if missing:
        names = ", ".join(missing)
        packages = " ".join(dict.fromkeys(p for ps in missing.values() for p in ps))
        raise TrackerError(f"train.report_to: {names} {'is' if len(missing) == 1 else 'are'} not installed; "
                           f"`pip install {packages}` (or `pip install koe5[trackers]`), or remove "
                           f"{'it' if len(missing) == 1 else 'them'} from train.report_to.")


# ---------------------------------------------------------------- the three entry points

def start(spec, spec_hash: str, run_dir: Path) -> None:
    """Open every tracker's run, or reopen it (a resumed run, a tracker's id already in trackers.json),
    and send the spec: the flattened resolved spec and the spec hash."""
    names = enabled(spec)
    if not names:
        return
    run_dir = Path(run_dir)
    state = _load_state(run_dir)
    params = flat_spec(spec)
    params["spec_hash"] = spec_hash
    for name in names:
        _guard(name, lambda: _START[name](spec, spec_hash, run_dir, state, params))
        _save_state(run_dir, state)


def training(spec, spec_hash: str, run_dir: Path, rank: int) -> "Reporter":
    """The trainer's reporter: rank 0's sends every train_log.jsonl row; other ranks' do nothing. A run
    started without the orchestrator (an emitted cluster job) opens its tracker runs here."""
    names = enabled(spec) if rank == 0 else []
    run_dir = Path(run_dir)
    if names and any(n not in _load_state(run_dir) for n in names):
        start(spec, spec_hash, run_dir)
    return Reporter(names, spec, run_dir)


def finish(spec, run_dir: Path, results: list, model_dir: Path | None, status: str) -> None:
    """After evaluation: the metrics of `results` (koe5.eval EvalResults) at the run's last step, the
    exported model as an artifact, and the run's end status (finished, failed or killed)."""
    names = enabled(spec)
    if not names:
        return
    run_dir = Path(run_dir)
    state = _load_state(run_dir)
    step = last_step(run_dir)
    metrics = eval_metrics(results)
    for name in names:
        if name in state:
            _guard(name, lambda: _FINISH[name](spec, run_dir, state[name], metrics, step, model_dir, status))


class Reporter:
    """Sends training rows to the trackers opened in one process."""

    def __init__(self, names: list[str], spec, run_dir: Path):
        self.sinks: dict[str, Any] = {}
        state = _load_state(run_dir) if names else {}
        for name in names:
            sink = _guard(name, lambda: _OPEN[name](spec, run_dir, state.get(name, {})))
            if sink is not None:
                self.sinks[name] = sink

    def log(self, row: dict) -> None:
        """One train_log.jsonl row: each scalar in SCALARS that has a value, at the row's step."""
        step = int(row["step"])
        scalars = {f"train/{k}": float(row[k]) for k in SCALARS if _number(row.get(k))}
        for name, sink in list(self.sinks.items()):
            if _guard(name, lambda: sink.log(scalars, step) or True) is None:
                self.sinks.pop(name)

    def close(self) -> None:
        for name, sink in self.sinks.items():
            _guard(name, sink.close)
        self.sinks = {}


# ---------------------------------------------------------------- what is sent

def flat_spec(spec) -> dict[str, Any]:
    """{key path: leaf} of the resolved spec, e.g. {'data.sources[0].path': '/abs/train.jsonl'}."""
    from koe5.spec.diff import flatten

    return flatten(dataclasses.asdict(spec))


def eval_metrics(results: list) -> dict[str, float]:
    """{'eval/<benchmark>/<metric>@<k>': value}, the fractions the registry records."""
    return {f"eval/{r.benchmark}/{metric}@{k}": float(v)
            for r in results for (metric, k), v in sorted(r.metrics.aggregate.items())}


def last_step(run_dir: Path) -> int:
    """The run's last optimizer step: train_summary.json's, else the training log's last row."""
    summary = run_dir / "train_summary.json"
    if summary.exists():
        return int(json.loads(summary.read_text())["steps"])
    step = 0
    log = run_dir / "train_log.jsonl"
    if log.exists():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                step = max(step, int(json.loads(line)["step"]))
            except (ValueError, KeyError):
                pass
    return step


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _guard(name: str, fn):
    """fn()'s result; a tracker that fails is named in one warning and gives None, the run goes on."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001: a tracker's failure must not end a training run
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"koe5: warning: train.report_to {name}: {type(e).__name__}: {reason[:300]}; not reporting "
              f"to {name} from this process", file=sys.stderr)
        return None


def _load_state(run_dir: Path) -> dict:
    path = Path(run_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _save_state(run_dir: Path, state: dict) -> None:
    path = Path(run_dir) / STATE_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------- TensorBoard

def _tb_writer(log_dir: str, purge_step: int | None = None):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=log_dir, purge_step=purge_step)


def _tb_start(spec, spec_hash, run_dir, state, params):
    from torch.utils.tensorboard.summary import hparams

    log_dir = str(run_dir / "tensorboard")
    state["tensorboard"] = {"log_dir": log_dir}
    writer = _tb_writer(log_dir)
    try:
        values = {k: v if isinstance(v, (int, float, str, bool)) else _text(v) for k, v in params.items()}
        metric_names = {f"eval/{b.name}/{m}@{k}": 0.0 for b in spec.eval.benchmarks
                        for m in ("ndcg", "recall", "precision", "f1", "mrr", "map") for k in spec.eval.k}
        for summary in hparams(values, metric_names or {"train/loss": 0.0}):
            writer.file_writer.add_summary(summary)
        writer.add_text("spec_hash", spec_hash)
        writer.add_text("spec", "```\n" + "\n".join(f"{k}: {_text(v)}" for k, v in params.items()) + "\n```")
    finally:
        writer.close()


class _TbSink:
    def __init__(self, writer):
        self.writer = writer

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # rows are few; a crashed rank keeps what it logged

    def close(self) -> None:
        self.writer.close()


def _tb_open(spec, run_dir, info):
    # A resumed rank repeats the steps after its checkpoint: purge_step makes TensorBoard drop the earlier
    # points from that step on, so each step shows once.
    resumed_at = _resume_step(run_dir)
    return _TbSink(_tb_writer(info.get("log_dir", str(run_dir / "tensorboard")),
                              purge_step=resumed_at + 1 if resumed_at else None))


def _resume_step(run_dir: Path) -> int:
    from koe5.train import checkpoint

    latest = checkpoint.latest(run_dir)
    return int(checkpoint.info(latest)["step"]) if latest else 0


def _tb_finish(spec, run_dir, info, metrics, step, model_dir, status):
    writer = _tb_writer(info["log_dir"])
    try:
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, step)
        writer.add_text("status", status, step)
    finally:
        writer.close()


# ---------------------------------------------------------------- MLflow

_MLFLOW_BAD = re.compile(r"[^\w\-. :/]")


def mlflow_name(key: str) -> str:
    """A key or metric name as MLflow accepts it: `a[0].b` -> `a.0.b`, `ndcg@10` -> `ndcg_at_10`."""
    key = re.sub(r"\[(\d+)\]", r".\1", key).replace("@", "_at_")
    return _MLFLOW_BAD.sub("_", key)[:250]


def mlflow_uri(spec) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = Path(spec.output_dir).resolve() / "mlruns"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _mlflow_client(uri: str):
    import logging

    from mlflow.tracking import MlflowClient

    # The SQLite store's schema migrations log a dozen INFO lines on first use.
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def _mlflow_start(spec, spec_hash, run_dir, state, params):
    from mlflow.entities import Param

    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as max_len
    except ImportError:
        max_len = 500
    info = state.get("mlflow")
    if info:  # resumed: the same MLflow run goes on
        client = _mlflow_client(info["tracking_uri"])
        client.update_run(info["run_id"], status="RUNNING")
        logged = client.get_run(info["run_id"]).data.params
    else:
        uri = mlflow_uri(spec)
        client = _mlflow_client(uri)
        experiment = client.get_experiment_by_name(spec.name)
        if experiment is None:
            location = None
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                location = (Path(spec.output_dir).resolve() / "mlruns" / "artifacts").as_uri()
            try:
                experiment_id = client.create_experiment(spec.name, artifact_location=location)
            except Exception:  # another run created it meanwhile
                experiment_id = client.get_experiment_by_name(spec.name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        run = client.create_run(experiment_id, run_name=run_dir.name,
                                tags={"koe5.spec_hash": spec_hash, "koe5.run_dir": str(run_dir)})
        info = {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run.info.run_id}
        state["mlflow"] = info
        logged = {}
    # Params are write-once in MLflow: a resume with a changed resume-safe key keeps the first value.
    new = [Param(mlflow_name(k), _text(v)[:max_len]) for k, v in params.items() if mlflow_name(k) not in logged]
    for i in range(0, len(new), 100):
        client.log_batch(info["run_id"], params=new[i:i + 100])


class _MlflowSink:
    def __init__(self, client, run_id):
        self.client, self.run_id = client, run_id

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_name(k), v, now, step)
                                                    for k, v in scalars.items()])

    def close(self) -> None:
        pass


def _mlflow_open(spec, run_dir, info):
    return _MlflowSink(_mlflow_client(info["tracking_uri"]), info["run_id"])


def _mlflow_finish(spec, run_dir, info, metrics, step, model_dir, status):
    from mlflow.entities import Metric

    client = _mlflow_client(info["tracking_uri"])
    now = int(time.time() * 1000)
    batch = [Metric(mlflow_name(k), v, now, step) for k, v in metrics.items()]
    for i in range(0, len(batch), 1000):
        client.log_batch(info["run_id"], metrics=batch[i:i + 1000])
    if model_dir is not None and Path(model_dir).is_dir():
        client.log_artifacts(info["run_id"], str(model_dir), artifact_path="model")
    client.set_terminated(info["run_id"], {"finished": "FINISHED", "killed": "KILLED"}.get(status, "FAILED"))


# ---------------------------------------------------------------- Weights & Biases
# W&B's public API (wandb.init with id + resume, run.log(step=), run.summary, wandb.Artifact). Each process
# (orchestrator at start and end, rank 0 while training) reopens the same run id; offline, each writes
# its own run directory under <run dir>/wandb/, which `wandb sync` joins by that id.

def _wandb_init(spec, run_dir, info, **kw):
    import wandb

    return wandb.init(project=info["project"], id=info["id"], resume="allow", dir=str(run_dir), **kw)


def _wandb_start(spec, spec_hash, run_dir, state, params):
    import wandb

    info = state.get("wandb")
    if info is None:
        # koe5's own id (W&B's generator moved between releases): 16 hex digits, unique per project.
        info = {"project": os.environ.get("WANDB_PROJECT") or spec.name, "id": secrets.token_hex(8)}
        state["wandb"] = info
    run = _wandb_init(spec, run_dir, info, name=run_dir.name, config={**params, "spec_hash": spec_hash},
                      tags=list(spec.tags))
    run.finish()


class _WandbSink:
    def __init__(self, run):
        self.run = run

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def _wandb_open(spec, run_dir, info):
    return _WandbSink(_wandb_init(spec, run_dir, info))


def _wandb_finish(spec, run_dir, info, metrics, step, model_dir, status):
    import wandb

    run = _wandb_init(spec, run_dir, info)
    if metrics:
        run.log(metrics, step=max(step, run.step))  # W&B steps only grow
        run.summary.update(metrics)
    if model_dir is not None and Path(model_dir).is_dir():
        artifact = wandb.Artifact(f"{run_dir.name}-model", type="model")
        artifact.add_dir(str(model_dir))
        run.log_artifact(artifact)
    run.finish(exit_code=0 if status == "finished" else 1)


_START = {"tensorboard": _tb_start, "mlflow": _mlflow_start, "wandb": _wandb_start}
_OPEN = {"tensorboard": _tb_open, "mlflow": _mlflow_open, "wandb": _wandb_open}
_FINISH = {"tensorboard": _tb_finish, "mlflow": _mlflow_finish, "wandb": _wandb_finish}
