"""The exported model behaves like a native sentence-transformers model: its prompts drive encode_query /
encode_document, it loads with no missing-weights report, its model card is portable, its MTEB result
files load with mteb's own classes, and `koe5 export RUN --push-to-hub` sends exactly the model directory."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from koe5 import cli
from koe5.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"
TEXTS = ["서울 지하철 환승은 몇 분 안에 해야 하나요?", "반려견 예방접종 시기"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny quickstart run (3 steps, a checkpoint at step 2, evaluated): (tmp dir, registry, run, model dir)."""
    tmp = tmp_path_factory.mktemp("export")
    registry = tmp / "koe5.duckdb"
    env = {**os.environ, "KOE5_REGISTRY": str(registry), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "koe5.run", str(QUICKSTART), "train.max_steps=3",
                           "train.save_every=2", "eval.baseline=false", f"output_dir={tmp / 'runs'}"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    reg = Registry(registry)
    run = reg.get_run("latest")
    model_dir = Path(next(a["path"] for a in run["artifacts"] if a["kind"] == "model"))
    return tmp, registry, run, model_dir


def load_quietly(load):
    """Call `load()` and return (result, everything printed or logged at WARNING or above meanwhile)."""
    import transformers

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("transformers", "sentence_transformers", "")]
    for lg in loggers:
        lg.addHandler(handler)
    transformers.logging.set_verbosity_warning()  # the default: what a user sees
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            result = load()
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    return result, out.getvalue() + err.getvalue() + "\n".join(records)


# ---- 1. prompts ----------------------------------------------------------------------------------

def test_encode_query_and_encode_document_use_the_e5_prefixes(trained):
    from sentence_transformers import SentenceTransformer

    *_, model_dir = trained
    st = SentenceTransformer(str(model_dir), device="cpu")
    assert st.prompts["query"] == "query: " and st.prompts["document"] == st.prompts["passage"] == "passage: "
    query, document = st.encode_query(TEXTS), st.encode_document(TEXTS)
    np.testing.assert_allclose(query, st.encode(["query: " + t for t in TEXTS]), atol=1e-6)
    np.testing.assert_allclose(document, st.encode(["passage: " + t for t in TEXTS]), atol=1e-6)
    np.testing.assert_allclose(st.encode(TEXTS, prompt_name="passage"), document, atol=1e-6)  # older callers
    # ... and the prefixes change the embeddings, so these checks could fail.
    plain = st.encode(TEXTS)
    assert np.abs(document - plain).max() > 1e-3 and np.abs(query - plain).max() > 1e-3
    assert np.abs(query - document).max() > 1e-3


# ---- 2. no missing-weights report ------------------------------------------------------------------

def test_the_export_loads_with_no_missing_or_unexpected_weights(trained):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    *_, model_dir = trained
    (model, info), said = load_quietly(lambda: AutoModel.from_pretrained(str(model_dir), output_loading_info=True))
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert "LOAD REPORT" not in said and "MISSING" not in said and "UNEXPECTED" not in said, said
    _, said = load_quietly(lambda: SentenceTransformer(str(model_dir), device="cpu"))
    assert "LOAD REPORT" not in said and "MISSING" not in said and "newly initialized" not in said, said


def test_the_pooler_head_is_set_aside_for_training_and_saved_back_untouched(tmp_path):
    """A base model with a pooler head (as multilingual-e5 has): koe5 trains without it and the export
    carries the base's head unchanged, beside the (here untouched) encoder weights."""
    import torch
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    from koe5.demo_model import build_demo_model
    from koe5.export import export_model
    from koe5.model import load_backbone

    torch.manual_seed(0)
    demo = build_demo_model()
    base = BertModel(BertConfig.from_pretrained(demo))  # with a pooler head
    base.save_pretrained(tmp_path / "base")
    AutoTokenizer.from_pretrained(demo).save_pretrained(tmp_path / "base")
    backbone, tokenizer = load_backbone(str(tmp_path / "base"))
    assert backbone.pooler is None and not any(k.startswith("pooler.") for k in backbone.state_dict())
    export_model(backbone, tokenizer, tmp_path / "out", pooling="mean", normalize=True, query_prefix="query: ",
                 passage_prefix="passage: ", max_seq_length=512)
    (out, info), said = load_quietly(lambda: AutoModel.from_pretrained(tmp_path / "out", output_loading_info=True))
    assert not info["missing_keys"] and not info["unexpected_keys"] and "LOAD REPORT" not in said
    theirs, ours = out.state_dict(), base.state_dict()
    assert set(theirs) == set(ours)
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], rtol=0, atol=0)


# ---- 3. the model card -----------------------------------------------------------------------------

ABSOLUTE_PATH = re.compile(r"(?<![\w.:/-])(?:/[\w.@+-]+){2,}|[A-Za-z]:\\|~/")


def test_the_model_card_is_portable_and_says_how_the_model_was_made(trained):
    tmp, registry, run, model_dir = trained
    card = (model_dir / "README.md").read_text(encoding="utf-8")
    for local in {str(tmp), str(tmp.resolve()), os.path.expanduser("~"), str(ROOT), "/tmp/"}:
        assert local not in card, local
    assert not ABSOLUTE_PATH.search(card), ABSOLUTE_PATH.search(card)
    mix = json.loads((model_dir.parent / "data_mix.json").read_text())
    for field in ("builtin:tiny-ko-bert", "| ko-sample | 96 |", str(mix["ko-sample"]["tokens"]),
                  "infonce (temperature 0.05", "| batch size | 32", "| learning rate | 0.001", "| steps | 3 |",
                  "| precision | fp32 |", "query 32, passage 128 tokens", "| max length (this export) | 512",
                  "encode_query", "encode_document"):
        assert field in card, field
    # Evaluated: the results table, filled in after evaluation by the orchestrator.
    ndcg10 = next(m["value"] for m in run["metrics"] if m["metric"] == "ndcg" and m["k"] == 10)
    assert re.search(rf"ndcg@10\s+{100 * ndcg10:.2f}", card), card
    assert "(not evaluated)" not in card
    # The spec section keeps the data's and benchmark's names, not where they lay.
    assert "path: train.jsonl" in card and "path: bench" in card


def test_a_local_base_model_is_named_by_hub_id_or_directory_name_never_by_path():
    from koe5.export import portable_model_name, portable_spec_yaml

    cache = "/home/someone/.cache/huggingface/hub/models--intfloat--multilingual-e5-large/snapshots/abc123"
    assert portable_model_name(cache) == ("intfloat/multilingual-e5-large", True)
    assert portable_model_name("/data/models/my-e5/") == ("my-e5", False)
    assert portable_model_name("intfloat/multilingual-e5-small") == ("intfloat/multilingual-e5-small", True)
    assert portable_model_name("builtin:tiny-ko-bert") == ("builtin:tiny-ko-bert", False)
    text = portable_spec_yaml("# koe5 resolved spec, spec_hash 0123\nmodel:\n  name_or_path: /data/models/my-e5\n"
                              "data:\n  sources:\n  - path: /home/someone/data/a.jsonl\n    name: a\n"
                              "output_dir: /srv/runs\nregistry:\n  path: null\n")
    assert text.startswith("# koe5 resolved spec, spec_hash 0123\n")
    assert "name_or_path: my-e5" in text and "path: a.jsonl" in text and "output_dir: runs" in text
    assert "/" not in text


# ---- 4. MTEB result files --------------------------------------------------------------------------

def test_mteb_result_files_load_with_mteb_and_keep_koe5s_numbers(trained):
    mteb = pytest.importorskip("mteb", reason="mteb (the dev extra) is not installed")
    _, _, run, _ = trained
    path = next(Path(a["path"]) for a in run["artifacts"] if a["kind"] == "mteb_json")
    result = mteb.TaskResult.from_disk(path)
    ours = {(m["metric"], m["k"]): m["value"] for m in run["metrics"] if m["benchmark"] == "ko-sample"}
    assert result.task_name == "ko-sample" and list(result.scores) == ["test"]
    scores = result.scores["test"][0]
    assert result.main_score == scores["main_score"] == ours[("ndcg", 10)]
    assert scores["ndcg_at_10"] == ours[("ndcg", 10)] and scores["recall_at_1"] == ours[("recall", 1)]
    assert scores["languages"] == ["kor-Hang"] and result.languages == ["kor"]


def test_a_preset_benchmark_is_written_as_its_mteb_task(tmp_path):
    """A benchmark named after a koe5 preset becomes MTEB's Korean task of that name (split, subset,
    revision as MTEB pins them); mteb validates the file against its own task definition."""
    mteb = pytest.importorskip("mteb", reason="mteb (the dev extra) is not installed")
    from koe5.eval.benchmark import load_benchmark
    from koe5.eval.evaluate import evaluate, write_mteb_json
    from test_eval_benchmark import ngram_encoder, write_beir

    bench = load_benchmark(str(write_beir(tmp_path / "b")), name="ko-strategyqa")
    enc = ngram_encoder()
    ours = evaluate(enc, enc, bench, [1, 10]).metrics.aggregate
    path = write_mteb_json(evaluate(enc, enc, bench, [1, 10]), str(tmp_path / "mteb"), "some-model")
    assert Path(path).name == "Ko-StrategyQA.json"
    result = mteb.TaskResult.from_disk(Path(path))
    task = mteb.get_task("Ko-StrategyQA")
    assert result.task_name == task.metadata.name and result.dataset_revision == task.metadata.revision
    checked = result.validate_and_filter_scores(task)  # raises if splits or subsets do not match the task
    scores = checked.scores["dev"][0]
    assert checked.get_score() == scores["ndcg_at_10"] == ours[("ndcg", 10)]
    assert scores["languages"] == ["kor-Hang"] and scores["hf_subset"] == "default"


# ---- 5. koe5 export RUN --push-to-hub ----------------------------------------------------------------

def files_under(directory: Path) -> dict[str, int]:
    return {p.relative_to(directory).as_posix(): p.stat().st_size for p in directory.rglob("*") if p.is_file()}


def test_push_dry_run_lists_exactly_the_model_directory(trained, capsys):
    _, registry, run, model_dir = trained
    assert any((model_dir.parent / "checkpoints").iterdir())  # the run has training state, beside the model
    code = cli.main(["export", run["run_id"][-6:], "--push-to-hub", "me/koe5-tiny", "--dry-run",
                     "--registry", str(registry)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "me/koe5-tiny" in out.splitlines()[0]
    listed = {}
    for line in out.splitlines()[2:]:
        rel, size = line.split()
        listed[rel] = int(size)
    assert listed == files_under(model_dir)
    assert {"model.safetensors", "config.json", "modules.json", "config_sentence_transformers.json",
            "README.md", "1_Pooling/config.json"} <= set(listed)
    assert not any(w in rel for rel in listed for w in ("checkpoint", "optim", "global_step", "rng"))


def test_push_sends_the_listed_files_to_the_named_repo(trained, capsys, monkeypatch):
    from huggingface_hub import HfApi, RepoUrl
    from huggingface_hub.utils import filter_repo_objects

    _, registry, run, model_dir = trained
    sent = {}
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(
        f"https://huggingface.co/{repo_id}", endpoint="https://huggingface.co"))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: sent.update(kw) or "https://huggingface.co/commit")
    code = cli.main(["export", "latest", "--push-to-hub", "me/koe5-tiny", "--registry", str(registry)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert sent["repo_id"] == "me/koe5-tiny" and Path(sent["folder_path"]) == model_dir
    # What upload_folder's own filter keeps of the directory is every file there.
    on_disk = sorted(files_under(model_dir))
    assert sorted(filter_repo_objects(on_disk, allow_patterns=sent["allow_patterns"])) == on_disk
    assert run["run_id"] in sent["commit_message"] and "pushed" in out


def test_push_without_a_token_or_network_fails_in_one_line(trained, tmp_path):
    _, registry, run, _ = trained
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"),  # no stored token either
               HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens there: no request leaves the machine

    def export(**extra):
        return subprocess.run([sys.executable, "-m", "koe5.cli", "export", run["run_id"], "--push-to-hub",
                               "me/koe5-tiny", "--registry", str(registry)], capture_output=True, text=True,
                              timeout=120, env={**env, **extra}, cwd=ROOT)

    proc = export()
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "token" in proc.stderr, proc.stderr
    proc = export(HF_TOKEN="hf_not_a_real_token")
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Could not push to the Hugging Face hub repo 'me/koe5-tiny'" in proc.stderr


def test_export_keeps_its_registry_file_export_and_says_what_it_needs(trained, tmp_path, capsys):
    _, registry, _, _ = trained
    code = cli.main(["export", "--format", "csv", "-o", str(tmp_path / "runs.csv"), "--registry", str(registry)])
    assert code == 0 and (tmp_path / "runs.csv").exists()
    capsys.readouterr()
    assert cli.main(["export", "--registry", str(registry)]) == 2
    assert "--push-to-hub" in capsys.readouterr().err
    assert cli.main(["export", "latest", "--registry", str(registry)]) == 2
    assert "--push-to-hub NAME" in capsys.readouterr().err


def test_training_state_and_hidden_files_are_never_uploaded(tmp_path):
    from koe5.registry.publish import left_out_files, model_files

    for rel in ("config.json", "1_Pooling/config.json", "optimizer.pt", "global_step3/mp_rank_00_model_states.pt",
                "checkpoints/step-2/latest.json", ".cache/huggingface/x", ".gitattributes"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}")
    assert model_files(tmp_path) == [("1_Pooling/config.json", 2), ("config.json", 2)]
    assert len(left_out_files(tmp_path)) == 5


def test_the_card_declares_matryoshka_widths_the_guide_and_token_packed_chunks():
    """Catches a card that hides how the model was trained: its Matryoshka widths (so a user can load it
    truncated), its guide, and chunks packed by tokens rather than by rows."""
    from koe5.export import model_card
    from koe5.spec import expand

    spec = expand(ROOT / "experiments" / "quickstart.yaml",
                  ["loss.matryoshka_dims=[32,64,128]", "loss.guide_model=builtin:tiny-ko-bert",
                   "loss.guide_margin=0.05", "cache.chunk_tokens=2048"])[0].spec
    card = model_card(spec=spec, spec_yaml="", data_mix={})
    assert "| Matryoshka widths | 32, 64, 128: load truncated with `SentenceTransformer(path, truncate_dim=32)` |" in card
    assert "| guided false-negative filtering | guide `builtin:tiny-ko-bert`, absolute margin 0.05 |" in card
    assert "| GradCache | chunks packed to 2048 tokens |" in card
