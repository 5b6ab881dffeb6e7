"""Evaluation during training (eval.every), the best step exported (train.keep_best) and early stopping.

The runs are test_distributed.py's (3 steps of the tiny model, constant learning rate), started through
the same launcher command, with the sample benchmark evaluated during training. Each logged metric is
checked against an independent evaluation: sentence-transformers loads the weights DeepSpeed saved in the
checkpoint of that step (or the export), encodes with the model's prompts, and pytrec_eval scores it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_distributed import ROOT, assert_same_weights, run_dir, trained_weights

BENCH_DIR = ROOT / "koe5" / "assets" / "ko_sample" / "bench"
BENCH = f"eval.benchmarks=[{{name: ko-sample, path: {BENCH_DIR}}}]"
BASE = ("cache.chunk_size=3", BENCH)
# lr 3e-3 overshoots on this data: NDCG@10 drops after the first step (measured: 7.4, 5.3, 6.8 x100), so
# the best step is not the last and keep_best has something to choose.
KEEP_BEST = (*BASE, "train.lr=3.0e-3", "eval.every=1", "train.keep_best.metric=ndcg@10", "train.save_every=1",
             "train.keep_checkpoints=3")


def eval_log(*overrides: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir(*overrides) / "eval_log.jsonl").read_text().splitlines()]


def summary(*overrides: str) -> dict:
    return json.loads((run_dir(*overrides) / "train_summary.json").read_text())


def checkpoint_weights(directory: Path, step: int) -> dict[str, torch.Tensor]:
    """The backbone weights DeepSpeed saved in the checkpoint of `step` (ZeRO 0: the whole module)."""
    tag = f"step-{step:08d}"
    saved = torch.load(directory / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)["module"]
    return {k[len("backbone."):]: v for k, v in saved.items() if k.startswith("backbone.")}


def independent_metrics(model_dir: Path, weights: dict | None = None) -> dict[str, float]:
    """NDCG@k and Recall@k of the sample benchmark by sentence-transformers and pytrec_eval, with `weights`
    loaded into the exported model's architecture (default: the export's own weights)."""
    from sentence_transformers import SentenceTransformer

    from koe5.eval.benchmark import load_benchmark

    st = SentenceTransformer(str(model_dir), device="cpu")
    if weights is not None:
        # Every weight koe5 trains; sentence-transformers builds BERT with its (unused) pooler head too.
        missing, unexpected = st[0].auto_model.load_state_dict(weights, strict=False)
        assert not unexpected and all(k.startswith("pooler.") for k in missing), (missing, unexpected)
    bench = load_benchmark(str(BENCH_DIR))
    queries = st.encode(bench.query_texts, prompt_name="query", convert_to_numpy=True)
    passages = st.encode(bench.corpus_texts, prompt_name="passage", convert_to_numpy=True)
    return pytrec_metrics(bench, queries, passages, (1, 3, 5, 10))


def pytrec_metrics(bench, queries: np.ndarray, passages: np.ndarray, ks) -> dict[str, float]:
    """NDCG@k and Recall@k by pytrec_eval from exact dot-product scores over the whole corpus."""
    import pytrec_eval

    scores = (queries @ passages.T).astype(np.float32)
    run = {q: {d: float(s) for d, s in zip(bench.corpus_ids, row)} for q, row in zip(bench.query_ids, scores)}
    measures = {f"ndcg_cut.{','.join(map(str, ks))}", f"recall.{','.join(map(str, ks))}"}
    per_query = pytrec_eval.RelevanceEvaluator(bench.qrels, measures).evaluate(run)
    out = {}
    for k in ks:
        out[f"ndcg@{k}"] = float(np.mean([m[f"ndcg_cut_{k}"] for m in per_query.values()]))
        out[f"recall@{k}"] = float(np.mean([m[f"recall_{k}"] for m in per_query.values()]))
    return out


def assert_metrics_match(logged: dict, independent: dict) -> None:
    for name, value in independent.items():
        assert logged[name] == pytest.approx(value, abs=1e-6), name


def test_logged_metrics_equal_an_independent_evaluation_of_each_checkpoint():
    """Catches an evaluation of other weights than the step's (e.g. the initial model, or the weights of the
    step before) and a row logged under the wrong step."""
    rows = eval_log(*KEEP_BEST)
    assert [r["step"] for r in rows] == [1, 2, 3] and {r["benchmark"] for r in rows} == {"ko-sample"}
    directory = run_dir(*KEEP_BEST)
    for step in (1, 2):  # the steps with a checkpoint (none is written at the last step)
        assert_metrics_match(rows[step - 1]["metrics"],
                             independent_metrics(directory / "model", checkpoint_weights(directory, step)))
    # Guard against a vacuous match: the steps really differ.
    assert rows[0]["metrics"]["ndcg@10"] != rows[1]["metrics"]["ndcg@10"]


def test_evaluation_leaves_training_as_it_was_and_logs_at_every_n_and_the_last_step():
    """With dropout on, a run evaluated every 2 steps trains exactly the weights of the same run without
    evaluation: the model stays in training mode (dropout off would change the weights) and evaluating draws
    nothing from the training's RNG. Its last row is the exported model's evaluation."""
    dropout = ("model.dropout=0.1",)
    evaluated = trained_weights(*BASE, *dropout, "eval.every=2")
    plain = trained_weights(*BASE, *dropout)
    assert all(torch.equal(evaluated[k], plain[k]) for k in plain)
    assert not torch.equal(trained_weights(*BASE)["encoder.layer.0.attention.self.query.weight"],
                           plain["encoder.layer.0.attention.self.query.weight"])  # dropout does act here
    rows = eval_log(*BASE, *dropout, "eval.every=2")
    assert [r["step"] for r in rows] == [2, 3]
    assert_metrics_match(rows[-1]["metrics"], independent_metrics(run_dir(*BASE, *dropout, "eval.every=2") / "model"))
    assert summary(*BASE, *dropout, "eval.every=2")["eval_seconds"] > 0


def test_keep_best_exports_exactly_the_best_steps_weights():
    """Catches an export of the last step, and a tie or comparison that picks another step."""
    rows = eval_log(*KEEP_BEST)
    values = [r["metrics"]["ndcg@10"] for r in rows]
    best_step = rows[values.index(max(values))]["step"]
    assert best_step == 1  # not the last step: otherwise exporting the last one would pass
    exported = trained_weights(*KEEP_BEST)
    directory = run_dir(*KEEP_BEST)
    best = checkpoint_weights(directory, best_step)
    assert exported.keys() == best.keys() and all(torch.equal(exported[k], best[k]) for k in best)
    later = checkpoint_weights(directory, 2)
    assert not all(torch.equal(exported[k], later[k]) for k in later)
    assert summary(*KEEP_BEST)["best"] == {"benchmark": "ko-sample", "metric": "ndcg@10", "step": 1,
                                           "value": max(values)}
    assert summary(*KEEP_BEST)["stopped_early_at"] is None and summary(*KEEP_BEST)["steps"] == 3


def test_two_zero3_ranks_evaluate_as_one_process_and_stop_together():
    """The same run on 2 ZeRO-3 ranks (partitioned weights, gathered for each evaluation by every rank) logs
    the metrics the one-process run logs, and with patience 1 both ranks leave the loop after step 2 (a rank
    that missed the decision would wait in the next step's collectives until the launcher's timeout)."""
    two = (*KEEP_BEST, "launch.nproc_per_node=2", "deepspeed.zero_stage=3", "train.keep_best.patience=1")
    one_rows, two_rows = eval_log(*KEEP_BEST), eval_log(*two)
    assert [r["step"] for r in two_rows] == [1, 2]
    for a, b in zip(one_rows, two_rows):
        assert b["metrics"] == pytest.approx(a["metrics"], abs=1e-6)
    assert summary(*two)["stopped_early_at"] == 2 and summary(*two)["steps"] == 2
    # Both export step 1. At lr 3e-3 AdamW's first step amplifies the ranks' rounding differences of
    # near-zero gradients 30x more than test_distributed's 1e-4 runs do (measured: 4e-5 at most, 2 weights);
    # step 2's weights are ~3e-3 away from step 1's.
    exported = trained_weights(*two)
    assert_same_weights(exported, trained_weights(*KEEP_BEST), tol=3e-4)
    step2 = checkpoint_weights(run_dir(*KEEP_BEST), 2)
    assert max((exported[k] - step2[k]).abs().max().item() for k in step2) > 1e-3


def koe5_run(*args: str, registry: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "KOE5_REGISTRY": str(registry), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "koe5.run", *args], capture_output=True, text=True, timeout=900,
                          env=env, cwd=ROOT)


def test_early_stopping_ends_the_run_finished_and_the_registry_has_every_evaluation(tmp_path):
    """A learning rate too small to move any weight: the metric never improves, so with patience 2 the run
    stops after its third evaluation (the first sets the best; a tie is no improvement), finished, and says
    so; the registry holds each evaluation at its step and the summary."""
    from koe5.registry import Registry

    registry = tmp_path / "reg.duckdb"
    spec = run_dir(*BASE).parent / "spec.yaml"  # test_distributed's spec
    proc = koe5_run(str(spec), *BASE, "train.lr=1.0e-12", "train.max_steps=10", "eval.every=1",
                    "train.keep_best.metric=ndcg@10", "train.keep_best.patience=2", f"output_dir={tmp_path}",
                    registry=registry)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stopped early after step 3 of 10" in proc.stdout
    run = Registry(registry).get_run("latest")
    assert run["status"] == "finished"
    assert run["train_summary"]["stopped_early_at"] == 3 and run["train_summary"]["steps"] == 3
    assert run["train_summary"]["best"]["step"] == 1
    log = [json.loads(line) for line in (tmp_path / f"dist-check-{run['run_id']}" / "eval_log.jsonl")
           .read_text().splitlines()]
    recorded = {(r["step"], f"{r['metric']}@{r['k']}"): r["value"] for r in run["eval_log"]}
    assert recorded == {(row["step"], name): value for row in log for name, value in row["metrics"].items()}
    assert {step for step, _ in recorded} == {1, 2, 3}
    assert len(recorded) == 3 * 6 * 4  # 3 evaluations x 6 metrics x 4 cut-offs
    _, last = Registry(registry).query("SELECT max(step) FROM train_log WHERE run_id = ?", [run["run_id"]])
    assert last == [(3,)]  # no training after the stop
    show = subprocess.run([sys.executable, "-m", "koe5.cli", "show", run["run_id"]], capture_output=True, text=True,
                          env={**os.environ, "KOE5_REGISTRY": str(registry), "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert "stopped early after step 3 of 10" in show.stdout
    assert "evaluation during training took" in show.stdout


def test_a_resumed_run_forgets_later_evaluations_and_keeps_the_best_weights_as_of_its_checkpoint(tmp_path):
    """Resuming from the checkpoint of step 4: the evaluations after it go (the run repeats those steps), and
    so do their best files, while the best as of step 4 (step 2, kept beside the later best when the
    checkpoint was written) is what the resumed run continues from and would export."""
    from test_distributed import _workdir

    from koe5.model import resolve_model_path
    from koe5.spec import expand
    from koe5.train.evaluation import DuringTraining, best_file, save_best

    spec = expand(_workdir() / "spec.yaml", list(KEEP_BEST))[0].spec
    rows = [(2, 0.5), (4, 0.4), (6, 0.7)]
    (tmp_path / "eval_log.jsonl").write_text("".join(
        json.dumps({"step": s, "benchmark": "ko-sample", "metrics": {"ndcg@10": v}, "seconds": 1.0}) + "\n"
        for s, v in rows) + '{"step": 8, "bench')  # and a row torn by the crash
    weights = {step: {"w": torch.full((2,), float(step))} for step, _ in rows}
    save_best(tmp_path, 2, weights[2], keep=set())
    save_best(tmp_path, 6, weights[6], keep={2})  # step 2 was the best when step 4's checkpoint was written

    during = DuringTraining(spec, resolve_model_path(spec.model.name_or_path), torch.device("cpu"), tmp_path, 0)
    during.resume(4)
    assert [json.loads(line)["step"] for line in (tmp_path / "eval_log.jsonl").read_text().splitlines()] == [2, 4]
    assert not best_file(tmp_path, 6).exists() and best_file(tmp_path, 2).exists()
    assert (during.best.step, during.best.value, during.best.since) == (2, 0.5, 1)
    assert torch.equal(during.export_state()["w"], weights[2]["w"])
