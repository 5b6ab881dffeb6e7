"""The quickstart end to end: koe5-run trains, evaluates and records; the model loads in
sentence-transformers; a finished spec is not trained twice; a bad override exits 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"


def koe5_run(*args: str, registry: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "KOE5_REGISTRY": str(registry), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "koe5.run", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quickstart")
    registry = tmp / "koe5.duckdb"
    proc = koe5_run(str(QUICKSTART), "train.max_steps=30", f"output_dir={tmp / 'runs'}", registry=registry)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return tmp, registry, proc


def test_quickstart_trains_evaluates_and_records(quickstart):
    tmp, registry, proc = quickstart
    from koe5.registry import Registry

    runs = {r["kind"]: r for r in Registry(registry).list_runs()}
    assert set(runs) == {"train", "baseline"}
    assert all(r["status"] == "finished" for r in runs.values())
    trained = Registry(registry).get_run(runs["train"]["run_id"])
    assert trained["run_id"] in proc.stdout  # the run id is printed
    metrics = {(m["benchmark"], m["metric"], m["k"]): m["value"] for m in trained["metrics"]}
    assert {"ndcg", "recall", "precision", "f1", "mrr", "map"} == {m for _, m, _ in metrics}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    base = {(m["benchmark"], m["metric"], m["k"]): m["value"]
            for m in Registry(registry).get_run(runs["baseline"]["run_id"])["metrics"]}
    # learning happens: clearly better than the untrained model it started from
    assert metrics[("ko-sample", "ndcg", 10)] > base[("ko-sample", "ndcg", 10)] + 0.03
    kinds = {a["kind"] for a in trained["artifacts"]}
    assert {"model", "per_query", "run_dir"} <= kinds
    # The training log has the first step, every log_every (10) steps and the last: curves start at step 1.
    run_dir = next(Path(a["path"]) for a in trained["artifacts"] if a["kind"] == "run_dir")
    logged = [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert logged == [1, 10, 20, 30]
    # DeepSpeed's per-run notices (no GPU detected, an op built) are not shown.
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr
    assert "built successfully" not in proc.stdout + proc.stderr
    # It prints one table, base against trained with the change, x100 as its header says.
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("metric (x100)") for line in lines) == 1
    for key in (("ndcg", 1), ("f1", 3), ("ndcg", 10)):
        row = next(line for line in lines if line.startswith(f"{key[0]}@{key[1]} "))
        old, new, change = map(float, row.split()[1:4])
        assert old == pytest.approx(100 * base[("ko-sample", *key)], abs=0.006)
        assert new == pytest.approx(100 * metrics[("ko-sample", *key)], abs=0.006)
        assert change == pytest.approx(new - old, abs=0.011)


def test_the_run_records_the_examples_and_tokens_drawn(quickstart):
    """data_mix holds what training actually consumed: 30 steps x 32 triples, and their real tokens,
    recounted here from the text with the tokenizer."""
    tmp, registry, _ = quickstart
    from koe5.data.dataset import load_tokenizer, load_training_data
    from koe5.registry import Registry
    from koe5.spec import expand

    run = next(r for r in Registry(registry).list_runs() if r["kind"] == "train")
    mix = Registry(registry).get_run(run["run_id"])["data_mix"]
    spec = expand(QUICKSTART, ["train.max_steps=30"])[0].spec
    rows = [json.loads(line) for line in Path(spec.data.sources[0].path).read_text(encoding="utf-8").splitlines()]
    tokenizer, data, m = load_tokenizer(spec), load_training_data(spec), spec.model

    def count(texts, prefix, max_len):
        return sum(len(ids) for ids in tokenizer([prefix + t for t in texts], truncation=True,
                                                 max_length=max_len)["input_ids"])
    drawn = [r for step in range(30) for r in data.global_batch(step).row.tolist()]
    tokens = (count([rows[r]["query"] for r in drawn], m.query_prefix, m.query_max_len)
              + count([rows[r][f] for r in drawn for f in ("document", "hard_negative")], m.passage_prefix,
                      m.passage_max_len))
    assert mix["ko-sample"]["examples"] == 30 * 32 and mix["ko-sample"]["tokens"] == tokens
    assert mix["_checks"]["examples"] == {"ko-sample": 320}


def test_exported_model_loads_in_sentence_transformers(quickstart):
    tmp, registry, _ = quickstart
    from sentence_transformers import SentenceTransformer

    from koe5.encoder import load_encoder
    from koe5.registry import Registry

    run = Registry(registry).list_runs(status="finished")
    model_dir = next(a["path"] for r in run for a in Registry(registry).get_run(r["run_id"])["artifacts"]
                     if a["kind"] == "model")
    st = SentenceTransformer(model_dir, device="cpu")
    texts = ["서울 지하철 환승은 몇 분 안에 해야 하나요?", "반려견 예방접종 시기"]
    ours = load_encoder(model_dir).encode(texts, "query: ", 32)
    theirs = st.encode(texts, prompt_name="query", convert_to_numpy=True)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
    card = (Path(model_dir) / "README.md").read_text(encoding="utf-8")
    assert "ndcg@10" in card and "builtin:tiny-ko-bert" in card  # the card carries results and base model
    # The model's own limit (the demo BERT's 512 positions), not the quickstart's training truncation of
    # 128: a user of the export must not have long documents cut at a training-speed choice.
    assert st.max_seq_length == 512
    long_text = "서울 지하철 " * 200
    np.testing.assert_allclose(st.encode([long_text], prompt_name="query", convert_to_numpy=True),
                               load_encoder(model_dir).encode([long_text], "query: ", 512), atol=1e-5)


def test_rerunning_a_finished_spec_does_not_train_again(quickstart):
    tmp, registry, _ = quickstart
    proc = koe5_run(str(QUICKSTART), "train.max_steps=30", f"output_dir={tmp / 'runs'}", registry=registry)
    assert proc.returncode == 0
    # ... and names the trained run, not the baseline recorded beside it
    from koe5.registry import Registry

    trained = next(r for r in Registry(registry).list_runs() if r["kind"] == "train")
    assert f"already has a finished run, {trained['run_id']}" in proc.stdout


def test_bad_override_exits_2_naming_the_key(tmp_path):
    proc = koe5_run(str(QUICKSTART), "train.batch_sise=64", "loss.temperature=-1", registry=tmp_path / "r.duckdb")
    assert proc.returncode == 2
    assert "train.batch_sise" in proc.stderr and "batch_size" in proc.stderr
    assert "loss.temperature" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r.duckdb").exists()  # nothing recorded


def test_dry_run_json_prints_spec_hash_and_command(tmp_path):
    proc = koe5_run(str(QUICKSTART), "--dry-run", "--json", registry=tmp_path / "r.duckdb")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"spec", "spec_hash", "command", "deepspeed"}
    assert out["spec"]["model"]["name_or_path"] == "builtin:tiny-ko-bert"
    assert out["deepspeed"]["train_batch_size"] == out["spec"]["train"]["batch_size"]
    assert out["deepspeed"]["managed_gradient_accumulation"] is False
    assert not (tmp_path / "r.duckdb").exists()


def test_from_run_reproduces_the_stored_spec(quickstart):
    tmp, registry, _ = quickstart
    from koe5.registry import Registry

    [trained] = Registry(registry).list_runs(status="finished", name_glob="quickstart")
    same = koe5_run("--from-run", trained["run_id"][:20], "--dry-run", "--json", registry=registry)
    assert same.returncode == 0, same.stderr
    assert json.loads(same.stdout)["spec_hash"] == trained["spec_hash"]
    varied = koe5_run("--from-run", trained["run_id"], "seed=3", "--dry-run", "--json", registry=registry)
    out = json.loads(varied.stdout)
    assert out["spec"]["seed"] == 3 and out["spec_hash"] != trained["spec_hash"]
    unknown = koe5_run("--from-run", "19990101", "--dry-run", registry=registry)
    assert unknown.returncode == 2 and "19990101" in unknown.stderr and "Traceback" not in unknown.stderr


def test_dry_run_json_lists_every_sweep_member(tmp_path):
    proc = koe5_run(str(QUICKSTART), "sweep.train.batch_size=[16,32]", "sweep.loss.temperature=[0.02,0.05]",
                    "--dry-run", "--json", registry=tmp_path / "r.duckdb")
    assert proc.returncode == 0, proc.stderr
    members = json.loads(proc.stdout)
    assert isinstance(members, list) and len(members) == 4
    assert len({m["spec_hash"] for m in members}) == 4
    assert {(m["sweep_values"]["train.batch_size"], m["sweep_values"]["loss.temperature"]) for m in members} == \
        {(16, 0.02), (16, 0.05), (32, 0.02), (32, 0.05)}
    assert all(m["spec"]["train"]["batch_size"] == m["sweep_values"]["train.batch_size"] for m in members)


def test_dry_run_checks_a_spec_meant_for_another_machine(tmp_path):
    """--dry-run launches nothing here: devices and paths of the target machine are warnings, not errors;
    the real run on this machine refuses the same spec."""
    args = [str(QUICKSTART), "launch.nproc_per_node=64", "launch.backend=deepspeed", "train.batch_size=64",
            "cache.chunk_size=1", "data.sources[0].path=/cluster/data/ko.jsonl"]
    dry = koe5_run(*args, "--dry-run", "--json", registry=tmp_path / "r.duckdb")
    assert dry.returncode == 0, dry.stderr
    assert "/cluster/data/ko.jsonl" in dry.stderr and "does not exist on this machine" in dry.stderr
    assert json.loads(dry.stdout)["spec"]["launch"]["nproc_per_node"] == 64
    real = koe5_run(*args, registry=tmp_path / "r.duckdb")
    assert real.returncode == 2 and "data.sources[0].path" in real.stderr
    # device checks come once the spec is otherwise valid (they import torch)
    real = koe5_run(*args[:-1], registry=tmp_path / "r.duckdb")
    assert real.returncode == 2 and "launch.nproc_per_node" in real.stderr
    assert not (tmp_path / "r.duckdb").exists()


def test_a_sweep_evaluates_the_untrained_model_once(tmp_path):
    """Catches a sweep whose members each re-evaluate the same untrained model (issue 19: a 5-step member
    spent ~155 s on it): one baseline run for the sweep, and every trained member compares against it."""
    from koe5.registry import Registry

    registry = tmp_path / "koe5.duckdb"
    proc = koe5_run(str(QUICKSTART), "sweep.loss.temperature=[0.02,0.05]", "train.max_steps=1",
                    f"output_dir={tmp_path / 'runs'}", registry=registry)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    runs = Registry(registry).list_runs()
    assert sorted(r["kind"] for r in runs) == ["baseline", "train", "train"]
    assert proc.stdout.count("baseline: evaluating the untrained model") == 1
    assert proc.stdout.count("was already evaluated with these settings") == 1
