"""train.report_to: a real koe5-run reports to TensorBoard and MLflow, read back with the trackers' own
readers against train_log.jsonl and the registry; a missing tracker library stops the run before
anything is recorded, with one line naming the key."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from koe5 import track

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"
STEPS = ["train.max_steps=4", "train.log_every=2", "eval.baseline=false"]


def koe5_run(*args: str, registry: Path, prelude: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_"))}
    env.update(KOE5_REGISTRY=str(registry), PYTHONPATH=str(ROOT))
    code = (prelude + "\nimport runpy, sys\nsys.argv = ['koe5-run', *sys.argv[1:]]\n"
            "runpy.run_module('koe5.run', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    pytest.importorskip("torch.utils.tensorboard")
    pytest.importorskip("mlflow")
    tmp = tmp_path_factory.mktemp("track")
    registry = tmp / "koe5.duckdb"
    proc = koe5_run(str(QUICKSTART), *STEPS, "train.report_to=[tensorboard,mlflow]", f"output_dir={tmp / 'runs'}",
                    registry=registry)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "warning: train.report_to" not in proc.stderr  # no tracker failed along the way
    from koe5.registry import Registry

    run = Registry(registry).get_run(next(r["run_id"] for r in Registry(registry).list_runs() if r["kind"] == "train"))
    run_dir = next(Path(a["path"]) for a in run["artifacts"] if a["kind"] == "run_dir")
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 4]
    metrics = {f"eval/{m['benchmark']}/{m['metric']}@{m['k']}": m["value"] for m in run["metrics"]}
    assert len(metrics) == 24  # 6 metrics x 4 cut-offs on ko-sample
    return tmp, run, run_dir, log, metrics


def test_tensorboard_has_the_training_log_the_eval_metrics_and_the_spec(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, run, run_dir, log, metrics = tracked
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for name in track.SCALARS:
        points = [(e.step, e.value) for e in events.Scalars(f"train/{name}")]
        assert [s for s, _ in points] == [r["step"] for r in log], name
        assert [v for _, v in points] == pytest.approx([r[name] for r in log], rel=1e-6), name  # float32
    final = log[-1]["step"]
    for tag, value in metrics.items():
        (point,) = events.Scalars(tag)
        assert point.step == final and point.value == pytest.approx(value, rel=1e-6), tag
    (text,) = events.Tensors("spec_hash/text_summary")
    assert text.tensor_proto.string_val[0].decode() == run["spec_hash"]
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


def test_mlflow_has_the_params_the_training_log_the_eval_metrics_and_the_model(tracked):
    from mlflow.tracking import MlflowClient

    tmp, run, run_dir, log, metrics = tracked
    state = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert state["tracking_uri"] == f"sqlite:///{tmp / 'runs' / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(state["tracking_uri"])
    (found,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert found.info.run_id == state["run_id"] and found.info.status == "FINISHED"
    params = found.data.params
    assert params["spec_hash"] == run["spec_hash"]
    assert params["train.max_steps"] == "4" and params["train.report_to.0"] == "tensorboard"
    assert params["data.sources.0.path"] == str(ROOT / "koe5" / "assets" / "ko_sample" / "train.jsonl")
    for name in track.SCALARS:
        history = sorted((m.step, m.value) for m in client.get_metric_history(state["run_id"], f"train/{name}"))
        assert history == [(r["step"], pytest.approx(r[name], rel=1e-12)) for r in log], name
    final = log[-1]["step"]
    for tag, value in metrics.items():
        (point,) = client.get_metric_history(state["run_id"], track.mlflow_name(tag))
        assert point.step == final and point.value == pytest.approx(value, rel=1e-12), tag
    listed = {f.path for f in client.list_artifacts(state["run_id"], "model")}
    assert {"model/model.safetensors", "model/config.json", "model/modules.json", "model/README.md"} <= listed


MISSING_MLFLOW = """
import sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
"""


def test_wandb_offline_gets_the_spec_the_training_log_and_the_eval_metrics(tmp_path):
    """W&B in its offline mode, with the real library: the orchestrator (spec), rank 0 (training log) and
    the orchestrator again (evaluation, model) each reopen the run id recorded in trackers.json, and each
    writes its offline run. wandb 0.31 ships no Python reader for its .wandb files, so the check reads the
    records' raw bytes for the keys and values koe5 logged (protobuf keeps strings as they are). Catches a
    tracker that fails on a real wandb (it used to: an API that moved) and only warns."""
    pytest.importorskip("wandb")
    registry = tmp_path / "koe5.duckdb"
    prelude = "import os\nos.environ.update(WANDB_MODE='offline', WANDB_SILENT='true')"
    proc = koe5_run(str(QUICKSTART), *STEPS, "train.report_to=[wandb]", f"output_dir={tmp_path / 'runs'}",
                    registry=registry, prelude=prelude)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "warning: train.report_to" not in proc.stderr, proc.stderr[-3000:]
    run_dir = next((tmp_path / "runs").glob("quickstart-*"))
    info = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    assert info["project"] == "quickstart"
    files = sorted((run_dir / "wandb").glob(f"offline-run-*-{info['id']}/run-{info['id']}.wandb"))
    assert len(files) == 3  # start, training, finish: one offline run each, joined by `wandb sync`
    start, training, finish = (f.read_bytes() for f in files)
    spec_hash = yaml_hash(run_dir / "spec.yaml")
    assert b"spec_hash" in start and spec_hash.encode() in start and b"train.lr" in start
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    for name in ("train/loss", "train/lr", "train/grad_norm"):
        assert name.encode() in training, name
    assert repr(log[-1]["loss"]).encode() in training  # the last logged loss, as JSON writes it
    assert b"eval/ko-sample/ndcg@10" in finish and b"-model" in finish  # the metrics and the model artifact


def yaml_hash(path: Path) -> str:
    """The spec hash a frozen spec.yaml records in its header comment."""
    import re

    return re.search(r"spec_hash[: ]+([0-9a-f]{16})", path.read_text()).group(1)


def test_a_missing_tracker_library_stops_the_run_before_anything_is_recorded(tmp_path):
    registry = tmp_path / "koe5.duckdb"
    proc = koe5_run(str(QUICKSTART), *STEPS, "train.report_to=[tensorboard,mlflow]", f"output_dir={tmp_path / 'runs'}",
                    registry=registry, prelude=MISSING_MLFLOW)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "report_to" in line]
    assert len(lines) == 1, proc.stderr
    assert "train.report_to: mlflow is not installed" in lines[0] and "pip install mlflow" in lines[0]
    assert "tensorboard" not in lines[0].split("installed")[0]  # only the missing one is named
    from koe5.registry import Registry

    assert not registry.exists() or Registry(registry).list_runs() == []
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").glob("quickstart-*"))


def test_check_installed_names_every_missing_library_in_one_error(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *a, **kw):
        if name.split(".")[0] in ("wandb", "tensorboard"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(track.TrackerError) as e:
        track.check_installed(["tensorboard", "wandb"])
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("train.report_to: tensorboard, wandb are not installed")
    assert "`pip install tensorboard wandb`" in message and "koe5[trackers]" in message
    track.check_installed([])  # nothing asked, nothing checked


def test_report_to_is_resume_safe_validated_and_outside_the_spec_hash():
    from koe5.spec import SpecError, expand
    from koe5.spec.introspect import resume_safe

    assert resume_safe("train.report_to") and resume_safe("train.report_to[0]")
    plain = expand(QUICKSTART)[0]
    tracked = expand(QUICKSTART, ["train.report_to=[tensorboard,mlflow]"])[0]
    assert plain.spec.train.report_to == [] and tracked.spec.train.report_to == ["tensorboard", "mlflow"]
    assert plain.spec_hash == tracked.spec_hash  # where results are reported is not the experiment
    with pytest.raises(SpecError, match="train.report_to"):
        expand(QUICKSTART, ["train.report_to=[tensorbord]"])


def test_only_rank_0_reports(tmp_path):
    from koe5.spec import expand

    spec = expand(QUICKSTART, ["train.report_to=[tensorboard]", f"output_dir={tmp_path}"])[0].spec
    reporter = track.training(spec, "h", tmp_path, rank=1)
    reporter.log({"step": 1, "loss": 1.0})
    reporter.close()
    assert reporter.sinks == {} and not (tmp_path / "tensorboard").exists()
    assert not (tmp_path / "trackers.json").exists()


def test_mlflow_goes_where_mlflow_tracking_uri_says(tmp_path, monkeypatch):
    from koe5.spec import expand

    spec = expand(QUICKSTART, [f"output_dir={tmp_path}"])[0].spec
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert track.mlflow_uri(spec) == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert track.mlflow_uri(spec) == "http://tracking.example:5000"
    assert track.mlflow_name("eval/ko-sample/ndcg@10") == "eval/ko-sample/ndcg_at_10"
    assert track.mlflow_name("data.sources[0].fields.query") == "data.sources.0.fields.query"
