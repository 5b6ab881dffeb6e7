"""A corpus of malformed specs and overrides: each must report its key path and the gist of the problem."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from koe5.spec import SpecError, expand
from koe5.spec import validate


def valid_spec() -> dict:
    return {
        "name": "t",
        "model": {"name_or_path": "builtin:tiny-ko-bert"},
        "data": {"sources": [{"path": "train.jsonl"}, {"path": "more.jsonl", "weight": 2}]},
        "train": {"max_steps": 5, "batch_size": 16, "device": "cpu"},
        "cache": {"chunk_size": 8},
        "eval": {"benchmarks": [{"name": "b", "path": "bench"}]},
    }


def write_files(root: Path) -> None:
    (root / "train.jsonl").write_text('{"query": "q", "document": "d", "hard_negative": "h"}\n', encoding="utf-8")
    (root / "more.jsonl").write_text('{"query": "q2", "document": "d2", "hard_negative": "h2"}\n', encoding="utf-8")
    (root / "bench").mkdir()
    (root / "bench" / "corpus.jsonl").write_text('{"_id": "1", "text": "문서"}\n', encoding="utf-8")


def put(d: dict, path: str, value) -> dict:
    """Set a dotted path (with [i] list indices) in d, creating mappings; returns d."""
    from koe5.spec.compose import parse_path

    tokens = parse_path(path)
    node = d
    for t in tokens[:-1]:
        node = node[t] if isinstance(t, int) else node.setdefault(t, {})
    node[tokens[-1]] = value
    return d


def drop(d: dict, path: str) -> dict:
    from koe5.spec.compose import parse_path

    tokens = parse_path(path)
    node = d
    for t in tokens[:-1]:
        node = node[t]
    del node[tokens[-1]]
    return d


def errors_for(tmp_path: Path, spec: dict | str, overrides=()) -> list[tuple[str, str]]:
    write_files(tmp_path)
    f = tmp_path / "spec.yaml"
    f.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    with pytest.raises(SpecError) as info:
        expand(f, overrides)
    assert str(f) in str(info.value)  # the report names the file
    return info.value.errors


# (id, mutation of the valid spec, overrides, expected key path, gist of the message)
CASES = [
    ("unknown-top", lambda d: put(d, "trian", {"lr": 1}), (), "trian", "did you mean `train`"),
    ("unknown-nested", lambda d: put(d, "model.poolin", "cls"), (), "model.poolin", "did you mean `model.pooling`"),
    ("unknown-in-list", lambda d: put(d, "data.sources[1].wieght", 2), (), "data.sources[1].wieght", "did you mean `data.sources[1].weight`"),
    ("wrong-section", lambda d: put(d, "train.temperature", 0.05), (), "train.temperature", "did you mean `loss.temperature`"),
    ("ovr-wrong-section", None, ["model.chunk_size=4"], "model.chunk_size", "did you mean `cache.chunk_size`"),
    ("unknown-no-hint", lambda d: put(d, "zzz", 1), (), "zzz", "known keys"),
    ("int-found-text", lambda d: put(d, "train.batch_size", "big"), (), "train.batch_size", "expected an integer, found text 'big'"),
    ("int-found-bool", lambda d: put(d, "train.max_steps", True), (), "train.max_steps", "expected an integer or null, found a boolean"),
    ("int-found-float", lambda d: put(d, "train.max_steps", 10.5), (), "train.max_steps", "found a number 10.5"),
    ("float-found-text", lambda d: put(d, "train.lr", "fast"), (), "train.lr", "expected a number, found text"),
    ("bool-found-text", lambda d: put(d, "model.normalize", "yes please"), (), "model.normalize", "true or false"),
    ("text-found-int", lambda d: put(d, "model.name_or_path", 123), (), "model.name_or_path", "expected text"),
    ("literal-pooling", lambda d: put(d, "model.pooling", "max"), (), "model.pooling", "one of 'mean' | 'cls'"),
    ("literal-hint", lambda d: put(d, "loss.name", "infonse"), (), "loss.name", "did you mean `infonce`"),
    ("zero-stage-4", lambda d: put(d, "deepspeed.zero_stage", 4), (), "deepspeed.zero_stage", "one of 0 | 1 | 2 | 3, found an integer 4"),
    ("zero-stage-text", lambda d: put(d, "deepspeed.zero_stage", "2"), (), "deepspeed.zero_stage", "found text '2'"),
    ("backend", lambda d: put(d, "launch.backend", "slurm"), (), "launch.backend", "one of 'auto'"),
    ("scheduler", lambda d: put(d, "train.scheduler", "step"), (), "train.scheduler", "'cosine'"),
    ("weight-zero", lambda d: put(d, "data.sources[1].weight", 0), (), "data.sources[1].weight", "weight > 0"),
    ("weight-negative", lambda d: put(d, "data.sources[0].weight", -1), (), "data.sources[0].weight", "found -1.0"),
    ("source-no-path", lambda d: drop(d, "data.sources[1].path"), (), "data.sources[1].path", "missing required key"),
    ("source-missing-file", lambda d: put(d, "data.sources[1].path", "nope.jsonl"), (), "data.sources[1].path", "nope.jsonl does not exist"),
    ("no-sources", lambda d: put(d, "data.sources", []), (), "data.sources", "at least one"),
    ("sources-not-list", lambda d: put(d, "data.sources", "train.jsonl"), (), "data.sources", "expected a list of a mapping"),
    ("bench-missing", lambda d: put(d, "eval.benchmarks[0].path", "nobench"), (), "eval.benchmarks[0].path", "does not exist"),
    ("bench-dup-name", lambda d: d["eval"]["benchmarks"].append({"name": "b", "path": "bench"}) or d, (), "eval.benchmarks[1].name", "used twice"),
    ("k-duplicate", lambda d: put(d, "eval.k", [1, 5, 5]), (), "eval.k", "unique"),
    ("k-zero", lambda d: put(d, "eval.k", [1, 0]), (), "eval.k[1]", "positive"),
    ("k-text", lambda d: put(d, "eval.k", [1, "ten"]), (), "eval.k[1]", "expected an integer"),
    ("temperature-zero", lambda d: put(d, "loss.temperature", 0), (), "loss.temperature", "temperature > 0"),
    ("temperature-negative", lambda d: put(d, "loss.temperature", -0.05), (), "loss.temperature", "found -0.05"),
    ("guide-missing-dir", lambda d: put(d, "loss.guide_model", "/nonexistent/guide"), (), "loss.guide_model",
     "guide model directory /nonexistent/guide does not exist"),
    ("guide-empty", lambda d: put(d, "loss.guide_model", " "), (), "loss.guide_model", "expected a model id or path"),
    ("guide-margin-abs", lambda d: put(put(d, "loss.guide_model", "builtin:tiny-ko-bert"), "loss.guide_margin", 2.5),
     (), "loss.guide_margin", "absolute margin in [0, 2)"),
    ("guide-margin-rel", lambda d: put(put(put(d, "loss.guide_model", "builtin:tiny-ko-bert"), "loss.guide_margin", 1.0),
                                       "loss.guide_margin_strategy", "relative"), (), "loss.guide_margin",
     "relative margin in [0, 1)"),
    ("guide-margin-negative", None, ["loss.guide_model=builtin:tiny-ko-bert", "loss.guide_margin=-0.1"],
     "loss.guide_margin", "found -0.1"),
    ("guide-strategy", None, ["loss.guide_model=builtin:tiny-ko-bert", "loss.guide_margin_strategy=relativ"],
     "loss.guide_margin_strategy", "did you mean `relative`"),
    ("guide-margin-alone", None, ["loss.guide_margin=0.1"], "loss.guide_margin", "only used with loss.guide_model"),
    ("guide-mask-alone", lambda d: put(d, "loss.guide_mask", ["in_batch"]), (), "loss.guide_mask",
     "only used with loss.guide_model"),
    ("guide-mask-empty", lambda d: put(put(d, "loss.guide_model", "builtin:tiny-ko-bert"), "loss.guide_mask", []), (),
     "loss.guide_mask", "at least one kind"),
    ("guide-mask-unknown", lambda d: put(put(d, "loss.guide_model", "builtin:tiny-ko-bert"), "loss.guide_mask",
                                         ["in_batch", "negatives"]), (), "loss.guide_mask[1]", "'hard_negatives'"),
    ("guide-mask-repeat", lambda d: put(put(d, "loss.guide_model", "builtin:tiny-ko-bert"), "loss.guide_mask",
                                        ["in_batch", "in_batch"]), (), "loss.guide_mask", "at most once"),
    ("guide-mask-queries-infonce", lambda d: put(put(d, "loss.guide_model", "builtin:tiny-ko-bert"), "loss.guide_mask",
                                                 ["queries"]), (), "loss.guide_mask", "only in loss.name symmetric_infonce"),
    ("mrl-empty", lambda d: put(d, "loss.matryoshka_dims", []), (), "loss.matryoshka_dims", "at least one width"),
    ("mrl-zero", lambda d: put(d, "loss.matryoshka_dims", [64, 0]), (), "loss.matryoshka_dims[1]", "positive width"),
    ("mrl-repeat", lambda d: put(d, "loss.matryoshka_dims", [64, 64]), (), "loss.matryoshka_dims", "at most once"),
    ("mrl-text", None, ["loss.matryoshka_dims=[64, big]"], "loss.matryoshka_dims[1]", "expected an integer"),
    ("mrl-weights-length", lambda d: put(put(d, "loss.matryoshka_dims", [64, 32]), "loss.matryoshka_weights", [1]),
     (), "loss.matryoshka_weights", "one weight per width of loss.matryoshka_dims (2), found 1"),
    ("mrl-weight-zero", lambda d: put(put(d, "loss.matryoshka_dims", [64, 32]), "loss.matryoshka_weights", [1, 0]),
     (), "loss.matryoshka_weights[1]", "weight > 0"),
    ("mrl-weights-alone", lambda d: put(d, "loss.matryoshka_weights", [1.0]), (), "loss.matryoshka_weights",
     "only used with loss.matryoshka_dims"),
    ("mrl-unnormalized", lambda d: put(put(d, "loss.matryoshka_dims", [64]), "model.normalize", False), (),
     "loss.matryoshka_dims", "set model.normalize true"),
    ("no-stop", lambda d: drop(d, "train.max_steps"), (), "train.max_steps", "max_steps or train.epochs"),
    ("epochs-zero", lambda d: put(d, "train.epochs", 0), (), "train.epochs", "positive"),
    ("chunk-over-batch", lambda d: put(d, "cache.chunk_size", 32), (), "cache.chunk_size", "larger than the per-rank batch 16"),
    ("chunk-over-rank-batch", lambda d: put(put(d, "launch.nproc_per_node", 2), "cache.chunk_size", 16), (),
     "cache.chunk_size", "per-rank batch 8"),
    ("batch-not-divisible", lambda d: put(put(d, "train.batch_size", 30), "launch.nproc_per_node", 4), (),
     "train.batch_size", "split evenly"),
    ("local-multi", lambda d: put(put(d, "launch.backend", "local"), "launch.nproc_per_node", 2), (),
     "launch.nproc_per_node", "'local' runs one process"),
    ("offload-opt-stage0", lambda d: put(d, "deepspeed.extra", {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}),
     (), "deepspeed.extra.zero_optimization.offload_optimizer", "zero_stage >= 1"),
    ("offload-param-stage2", lambda d: put(put(d, "deepspeed.zero_stage", 2), "deepspeed.extra",
                                           {"zero_optimization": {"offload_param": {"device": "cpu"}}}),
     (), "deepspeed.extra.zero_optimization.offload_param", "zero_stage >= 3"),
    ("extra-batch", lambda d: put(d, "deepspeed.extra", {"train_batch_size": 99}), (), "deepspeed.extra.train_batch_size", "contradicts"),
    ("extra-stage", lambda d: put(d, "deepspeed.extra", {"zero_optimization": {"stage": 3}}), (),
     "deepspeed.extra.zero_optimization.stage", "(0)"),
    ("missing-name", lambda d: drop(d, "name"), (), "name", "missing required key"),
    ("name-slash", lambda d: put(d, "name", "a/b"), (), "name", "without slashes"),
    ("model-not-mapping", lambda d: put(d, "model", "e5"), (), "model", "expected a mapping, found text"),
    ("tags-text", lambda d: put(d, "tags", "x"), (), "tags", "expected a list of text"),
    ("warmup", lambda d: put(d, "train.warmup_ratio", 1.5), (), "train.warmup_ratio", "[0, 1)"),
    ("dropout", lambda d: put(d, "model.dropout", 1.0), (), "model.dropout", "probability"),
    ("interp-unknown", lambda d: put(d, "cache.chunk_size", "${train.batchsize}"), (), "cache.chunk_size",
     "did you mean `train.batch_size`"),
    ("interp-cycle", lambda d: put(put(d, "train.lr", "${train.weight_decay}"), "train.weight_decay", "${train.lr}"), (),
     "train.lr", "cycle"),
    # evaluation during training, keep_best, early stopping
    ("every-zero", None, ["eval.every=0"], "eval.every", "positive number of steps"),
    ("every-no-bench", lambda d: put(d, "eval.benchmarks", []), ["eval.every=5"], "eval.every", "needs a benchmark"),
    ("during-unknown", None, ["eval.every=5", "eval.during=[bb]"], "eval.during[0]", "no benchmark named 'bb'"),
    ("keep-best-no-every", None, ["train.keep_best.metric=ndcg@10"], "train.keep_best.metric", "set eval.every"),
    ("keep-best-bad-metric", None, ["eval.every=5", "train.keep_best.metric=ndgc@10"], "train.keep_best.metric",
     "NAME@K with NAME one of ndcg"),
    ("keep-best-k-missing", None, ["eval.every=5", "train.keep_best.metric=ndcg@7"], "train.keep_best.metric",
     "needs k=7 in eval.k"),
    ("keep-best-bench", None, ["eval.every=5", "train.keep_best.metric=ndcg@10", "train.keep_best.benchmark=c"],
     "train.keep_best.benchmark", "'c' is not evaluated during training"),
    ("keep-best-bench-not-during", lambda d: d["eval"]["benchmarks"].append({"name": "c", "path": "bench"}) or d,
     ["eval.every=5", "eval.during=[b]", "train.keep_best.metric=ndcg@10", "train.keep_best.benchmark=c"],
     "train.keep_best.benchmark", "(eval.during: b)"),
    ("patience-zero", None, ["eval.every=5", "train.keep_best.metric=ndcg@10", "train.keep_best.patience=0"],
     "train.keep_best.patience", "positive number of evaluations"),
    ("patience-no-metric", None, ["eval.every=5", "train.keep_best.patience=3"], "train.keep_best.patience",
     "watches train.keep_best.metric"),
    # overrides
    ("ovr-unknown", None, ["trian.lr=1"], "trian.lr", "did you mean `train`"),
    ("ovr-unknown-nested", None, ["loss.temprature=0.1"], "loss.temprature", "did you mean `loss.temperature`"),
    ("ovr-index", None, ["data.sources[5].weight=2"], "data.sources[5].weight", "does not exist (the list has 2 items"),
    ("ovr-type", None, ["train.batch_size=abc"], "train.batch_size", "expected an integer, found text 'abc'"),
    ("ovr-type-list", None, ["data.sources[1].weight=-3"], "data.sources[1].weight", "weight > 0"),
    ("ovr-no-equals", None, ["train.lr"], "train.lr", "key=value"),
    ("ovr-list-as-map", None, ["data.sources.weight=2"], "data.sources.weight", "is a list"),
    ("ovr-bad-path", None, ["train..lr=1"], "train..lr", "not a key path"),
    # sweeps
    ("sweep-unknown", lambda d: put(d, "sweep", {"trian.batch_size": [8, 16]}), (), "sweep.trian.batch_size", "did you mean `train`"),
    ("sweep-bad-value", lambda d: put(d, "sweep", {"train.batch_size": [16, "x"]}), (), "sweep.train.batch_size[1]",
     "expected an integer"),
    ("sweep-not-list", lambda d: put(d, "sweep", {"train.lr": 0.1}), (), "sweep.train.lr", "non-empty list"),
    ("sweep-not-mapping", lambda d: put(d, "sweep", [1, 2]), (), "sweep", "expected a mapping"),
    ("sweep-repeat", lambda d: put(d, "sweep", {"train.lr": [0.1, 0.1]}), (), "sweep.train.lr", "repeat"),
    ("sweep-member-rule", lambda d: put(d, "sweep", {"train.batch_size": [16, 4]}), (), "cache.chunk_size",
     "sweep members with train.batch_size=4)"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed(tmp_path, case):
    _, mutate, overrides, path, gist = case
    spec = mutate(valid_spec()) if mutate else valid_spec()
    errors = errors_for(tmp_path, spec, overrides)
    hits = [m for p, m in errors if p == path]
    assert hits, f"no error at {path}; got {errors}"
    assert any(gist.lower() in m.lower() for m in hits), f"{gist!r} not in {hits}"


def test_corpus_is_large_enough():
    assert len(CASES) >= 30


def test_many_independent_errors_reported_together(tmp_path):
    d = valid_spec()
    put(d, "model.poolin", "cls")
    put(d, "data.sources[1].weight", -2)
    put(d, "loss.temperature", 0)
    put(d, "eval.k", [3, 3])
    put(d, "train.precision", "fp8")
    errors = errors_for(tmp_path, d, ["trian.lr=1"])
    paths = {p for p, _ in errors}
    assert {"model.poolin", "data.sources[1].weight", "loss.temperature", "eval.k", "train.precision",
            "trian.lr"} <= paths


def test_error_names_file_and_line(tmp_path):
    text = textwrap.dedent("""\
        name: t
        model:
          name_or_path: builtin:tiny-ko-bert
        data:
          sources:
            - path: train.jsonl
            - path: more.jsonl
              weight: -1
        train: {max_steps: 5, batch_size: 16, device: cpu}
        cache: {chunk_size: 8}
        """)
    errors = errors_for(tmp_path, text)
    assert errors == [("data.sources[1].weight", f"{tmp_path / 'spec.yaml'}:8: expected a weight > 0, found -1.0")]


@pytest.mark.parametrize("text,line,col", [
    ("name: t\nmodel:\n  name_or_path: [unclosed\n", 4, 1),
    ("name: t\nmodel: {a: 1\n", 3, 1),
    ("name: t\n  bad: indent\n", 2, 6),
])
def test_yaml_syntax_error_has_line_and_column(tmp_path, text, line, col):
    errors = errors_for(tmp_path, text)
    assert len(errors) == 1
    assert f"spec.yaml:{line}:{col}: YAML syntax error" in errors[0][1]


def test_forbidden_character_has_line_and_column(tmp_path):
    errors = errors_for(tmp_path, "name: t\ntags: [a\x00b]\n")
    assert "spec.yaml:2:9: character U+0000 is not allowed" in errors[0][1]


def test_duplicate_key(tmp_path):
    errors = errors_for(tmp_path, "name: a\nname: b\n")
    assert errors[0][0] == "name" and "duplicate key" in errors[0][1] and "spec.yaml:1" in errors[0][1]


def test_empty_and_non_mapping_files(tmp_path):
    assert "empty" in errors_for(tmp_path, "")[0][1]
    (tmp_path / "l.yaml").write_text("- 1\n")
    with pytest.raises(SpecError, match="mapping"):
        expand(tmp_path / "l.yaml")


def test_base_missing_and_cycle(tmp_path):
    d = valid_spec()
    d["base"] = "nowhere.yaml"
    errors = errors_for(tmp_path, d)
    assert errors[0][0] == "base" and "nowhere.yaml does not exist" in errors[0][1]
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(SpecError) as info:
        expand(tmp_path / "a.yaml")
    assert info.value.errors[0][0] == "base" and "cycle" in info.value.errors[0][1]
    assert "a.yaml -> " in info.value.errors[0][1]


# ---- checks against the machine (device facts are faked, so these run anywhere)

def device_errors(tmp_path, monkeypatch, facts, **train_launch):
    monkeypatch.setattr(validate, "device_info", lambda: facts)
    d = valid_spec()
    for k, v in train_launch.items():
        put(d, k.replace("__", "."), v)
    write_files(tmp_path)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(d))
    try:
        return expand(tmp_path / "spec.yaml")[0].warnings, []
    except SpecError as e:
        return [], e.errors


def test_fp16_on_cpu_is_an_error(tmp_path, monkeypatch):
    _, errors = device_errors(tmp_path, monkeypatch, (0, False), train__precision="fp16")
    assert errors[0][0] == "train.precision" and "needs a CUDA GPU" in errors[0][1]


def test_fp16_on_auto_without_gpu_says_auto(tmp_path, monkeypatch):
    _, errors = device_errors(tmp_path, monkeypatch, (0, False), train__precision="fp16", train__device="auto")
    assert "auto found no CUDA device" in errors[0][1]


def test_bf16_on_cpu_warns(tmp_path, monkeypatch):
    warnings, errors = device_errors(tmp_path, monkeypatch, (0, False), train__precision="bf16")
    assert not errors and any("bf16 on CPU" in w for w in warnings)


def test_varlen_attention_in_fp32_on_a_gpu_is_an_error(tmp_path, monkeypatch):
    """FlashAttention's varlen kernel takes bf16/fp16 only; train.device auto must find the GPU to say so."""
    _, errors = device_errors(tmp_path, monkeypatch, (1, True), model__attention="varlen", train__device="auto")
    assert errors[0][0] == "model.attention" and "train.precision: bf16" in errors[0][1]
    (tmp_path / "bf16").mkdir()
    warnings, errors = device_errors(tmp_path / "bf16", monkeypatch, (1, True), model__attention="varlen",
                                     train__device="cuda", train__precision="bf16")
    assert not errors and not any("varlen" in w for w in warnings)


def test_varlen_attention_on_cpu_warns_that_the_kernel_does_not_run(tmp_path, monkeypatch):
    warnings, errors = device_errors(tmp_path, monkeypatch, (0, False), model__attention="varlen")
    assert not errors and any("model.attention: varlen on CPU" in w and "reference" in w for w in warnings)


def test_cuda_requested_without_gpu(tmp_path, monkeypatch):
    _, errors = device_errors(tmp_path, monkeypatch, (0, False), train__device="cuda")
    assert errors[0][0] == "train.device"


def test_bf16_on_old_gpu(tmp_path, monkeypatch):
    _, errors = device_errors(tmp_path, monkeypatch, (1, False), train__device="cuda", train__precision="bf16")
    assert errors[0][0] == "train.precision" and "not supported by this GPU" in errors[0][1]


def test_more_processes_than_gpus(tmp_path, monkeypatch):
    four = dict(train__device="auto", launch__nproc_per_node=4, cache__chunk_size=4)
    _, errors = device_errors(tmp_path, monkeypatch, (2, True), **four)
    assert errors[0][0] == "launch.nproc_per_node" and "only 2 CUDA" in errors[0][1]
    (tmp_path / "ok").mkdir()
    _, errors = device_errors(tmp_path / "ok", monkeypatch, (4, True), **four)
    assert not errors


def test_more_cpu_processes_than_cpus(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    _, errors = device_errors(tmp_path, monkeypatch, (0, False), launch__nproc_per_node=4, train__batch_size=16,
                              cache__chunk_size=4)
    assert errors[0][0] == "launch.nproc_per_node" and "2 CPUs" in errors[0][1]


def test_a_spec_meant_for_another_machine_still_fails_what_fails_everywhere(tmp_path, monkeypatch):
    """--dry-run and --emit skip this machine's device checks, but fp16 with train.device cpu fails on every
    machine: exit 2 there too. What this machine lacks (GPUs) is a warning naming the key."""
    monkeypatch.setattr(validate, "device_info", lambda: (0, False))
    write_files(tmp_path)
    d = valid_spec()
    put(d, "train.precision", "fp16")
    put(d, "train.device", "cpu")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(SpecError) as info:
        expand(tmp_path / "spec.yaml", check_devices=False)
    assert info.value.errors[0][0] == "train.precision" and "needs a CUDA GPU" in info.value.errors[0][1]
    put(d, "train.device", "cuda")
    put(d, "launch.nproc_per_node", 2)
    put(d, "cache.chunk_size", 4)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(d))
    [rs] = expand(tmp_path / "spec.yaml", check_devices=False)
    assert any(w.startswith("train.device:") and "it must hold where the run starts" in w for w in rs.warnings)


# ---- speed: errors without torch, well under a second

def test_errors_are_fast_and_do_not_import_torch(tmp_path):
    d = valid_spec()
    put(d, "train.precision", "fp16")  # would need device facts (train.device auto) if the rest were valid
    put(d, "train.device", "auto")
    put(d, "model.poolin", "cls")
    write_files(tmp_path)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(d))
    code = textwrap.dedent(f"""
        import sys, time
        t = time.perf_counter()
        from koe5.spec import expand, SpecError
        try:
            expand({str(tmp_path / 'spec.yaml')!r})
        except SpecError as e:
            print(round(time.perf_counter() - t, 3), 'torch' in sys.modules, len(e.errors))
        """)
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=60)
    seconds, torch_loaded, n = out.stdout.split()
    assert torch_loaded == "False" and n == "1"
    assert float(seconds) < 0.5, seconds


def test_interpolation_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("KOE5_SURELY_UNSET", raising=False)
    d = valid_spec()
    d["tags"] = ["${env:KOE5_SURELY_UNSET}", "${registry.path}x", "${data.sources[7].path}"]
    d["model"]["query_prefix"] = "${eval}"  # a mapping cannot be formatted... but alone it is taken as is
    d["model"]["passage_prefix"] = "p ${eval} q"
    errors = dict(errors_for(tmp_path, d))
    assert "KOE5_SURELY_UNSET is not set" in errors["tags[0]"]
    assert "tags[1]" not in errors  # null formats as text
    assert "list item that is not in the spec" in errors["tags[2]"]
    assert "expected text, found a mapping" in errors["model.query_prefix"]
    assert "cannot be formatted into text" in errors["model.passage_prefix"]


def test_a_section_of_the_wrong_type_is_one_error(tmp_path):
    d = valid_spec()
    d["train"] = 5
    errors = errors_for(tmp_path, d)
    line = (tmp_path / "spec.yaml").read_text().splitlines().index("train: 5") + 1
    assert errors == [("train", f"{tmp_path / 'spec.yaml'}:{line}: expected a mapping, found an integer 5")]
