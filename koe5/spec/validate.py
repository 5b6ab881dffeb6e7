"""Checking a composed spec dict against the schema, then the rules that tie keys together.

Every check appends (key path, message) to a shared list instead of raising, so one pass reports every
problem. Nothing here loads a model or reads data; CUDA is asked about (importing torch) only when the
spec is otherwise valid and its precision or process count depends on the GPUs present.
"""

from __future__ import annotations

import codecs
import math
import os
import typing
from pathlib import Path
from typing import Any, Callable, Literal

from koe5.data.sources import FILE_FORMATS, is_hub_id
from koe5.spec import introspect, schema
from koe5.spec.compose import Origins, type_name
from koe5.spec.deepspeed import conflicts, derived_config
from koe5.spec.errors import did_you_mean, join_path

Errors = list[tuple[str, str]]


def nearest_origin(path: str, origins: Origins):
    """Where the key (or its nearest parent that was written down) came from; None for pure defaults."""
    while path:
        if path in origins:
            return origins[path]
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return None


def label_for(path: str, origins: Origins) -> str:
    """'file:line: ' (or 'override `k=v`: ') for messages about a key, '' for defaults."""
    origin = nearest_origin(path, origins)
    return origin.label + ": " if origin else ""


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type_name(value)} {text if len(text) < 60 else text[:57] + '...'}"


# ---------------------------------------------------------------- types

def build(tp: Any, value: Any, path: str, errors: Errors, origins: Origins) -> Any:
    """`value` converted to `tp` (dataclasses built recursively); on error, record it and return None."""
    inner, optional = introspect.unwrap_optional(tp)

    def fail(expected: str) -> None:
        if optional and "or null" not in expected:
            expected += " or null"
        errors.append((path, f"{label_for(path, origins)}expected {expected}, found {_show(value)}"))

    if value is None:
        if optional:
            return None
        if introspect.is_section(inner):  # `loss:` with nothing under it means all defaults
            return build(inner, {}, path, errors, origins)
        fail(introspect.describe_type(tp))
        return None
    if typing.get_origin(inner) is Literal:
        choices = typing.get_args(inner)
        if any(type(value) is type(c) and value == c for c in choices):
            return value
        hint = did_you_mean(str(value), [str(c) for c in choices]) if isinstance(value, str) else ""
        fail(introspect.describe_type(inner) + "." + hint if hint else introspect.describe_type(inner))
        return None
    if introspect.is_section(inner):
        if not isinstance(value, dict):
            fail("a mapping")
            return None
        return build_section(inner, value, path, errors, origins)
    item = introspect.list_item(inner)
    if item is not None:
        if not isinstance(value, list):
            fail(introspect.describe_type(inner))
            return None
        return [build(item, v, join_path(path, i), errors, origins) for i, v in enumerate(value)]
    if introspect.is_free_dict(inner):
        if not isinstance(value, dict):
            fail("a mapping")
            return None
        _check_json(value, path, errors, origins)
        return value
    if inner is bool:
        if isinstance(value, bool):
            return value
        fail("true or false")
        return None
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail("an integer")
        return None
    if inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        fail("a number")
        return None
    if inner is str:
        if isinstance(value, str):
            return value
        fail("text (put quotes around it)" if isinstance(value, (int, float, bool)) else "text")
        return None
    raise TypeError(f"schema type {tp!r} at {path} is not supported by the validator")


def build_section(cls: type, value: dict, path: str, errors: Errors, origins: Origins) -> Any:
    fields = introspect.fields_of(cls)
    for key in value:
        if key not in fields:
            key_path = join_path(path, str(key))
            hint = introspect.suggest(str(key), list(fields), path)
            errors.append((key_path, f"{label_for(key_path, origins)}unknown key.{hint}"))
    kwargs = {}
    for name, (tp, f) in fields.items():
        key_path = join_path(path, name)
        if name in value:
            kwargs[name] = build(tp, value[name], key_path, errors, origins)
            continue
        default = introspect.default_of(f, introspect.unwrap_optional(tp)[0])
        if default is schema.REQUIRED:
            where = label_for(path, origins) if path else ""
            errors.append((key_path, f"{where}missing required key ({f.metadata['doc']})"))
            kwargs[name] = None
        elif introspect.is_section(tp):
            kwargs[name] = build_section(tp, {}, key_path, errors, origins)
        else:
            kwargs[name] = default
    return cls(**kwargs)


def _check_json(value: Any, path: str, errors: Errors, origins: Origins) -> None:
    """deepspeed.extra ends up in a JSON file, so it may only hold JSON values."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                errors.append((path, f"{label_for(path, origins)}keys must be text, found {_show(k)}"))
            _check_json(v, join_path(path, str(k)), errors, origins)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json(v, join_path(path, i), errors, origins)
    elif not (value is None or isinstance(value, (str, int, float, bool))):
        errors.append((path, f"{label_for(path, origins)}expected a JSON value, found {_show(value)}"))


# ---------------------------------------------------------------- paths

def resolve_paths(spec: schema.Spec, origins: Origins, cwd: Path) -> None:
    """Make every path absolute. Data and benchmark paths are relative to the file (or override) that
    wrote them; output_dir and registry.path are relative to the working directory."""
    def absolute(value: str, path: str) -> str:
        origin = nearest_origin(path, origins)
        base = origin.directory if origin else cwd
        return str((base / Path(value).expanduser()).resolve()) if value else value

    sources = spec.data.sources if spec.data is not None else None  # None: failed its type check
    for i, s in enumerate(sources if isinstance(sources, list) else []):
        if s is not None and isinstance(s.path, str) and not is_hub_id(s.path):
            s.path = absolute(s.path, f"data.sources[{i}].path")
    for i, b in enumerate(spec.eval.benchmarks if isinstance(spec.eval.benchmarks, list) else []):
        if b is not None and isinstance(b.path, str):
            b.path = absolute(b.path, f"eval.benchmarks[{i}].path")
    if isinstance(spec.launch.hostfile, str) and spec.launch.hostfile:
        spec.launch.hostfile = absolute(spec.launch.hostfile, "launch.hostfile")
    if isinstance(spec.output_dir, str) and spec.output_dir:
        spec.output_dir = str((cwd / Path(spec.output_dir).expanduser()).resolve())
    if isinstance(spec.registry.path, str) and spec.registry.path:
        spec.registry.path = str((cwd / Path(spec.registry.path).expanduser()).resolve())


# ---------------------------------------------------------------- rules between keys

class _Broken(set):
    """Key paths that already have an error; a key under a broken section counts as broken too, so a
    section of the wrong type (`train: 5`) does not also report rules about its defaulted keys."""

    def __contains__(self, path: object) -> bool:
        p = str(path)
        while p:
            if set.__contains__(self, p):
                return True
            cut = max(p.rfind("."), p.rfind("["))
            p = p[:cut] if cut > 0 else ""
        return False


def check_rules(spec: schema.Spec, errors: Errors, origins: Origins, elsewhere: list[str] | None = None) -> None:
    """Value ranges and cross-field rules. Keys that already failed their type check are skipped.
    With `elsewhere` (a spec meant for another machine: --dry-run, --emit), a data or benchmark path
    missing here is a warning appended to it instead of an error."""
    broken = _Broken(p for p, _ in errors)

    def bad(path: str, message: str) -> None:
        if path not in broken:
            errors.append((path, label_for(path, origins) + message))

    def missing(path: str, message: str) -> None:
        if elsewhere is None:
            bad(path, message)
        elif path not in broken:
            elsewhere.append(f"{path}: {message} on this machine; it must exist where the run starts")

    def need(path: str, value: Any, ok: Callable[[Any], bool], message: str) -> None:
        if value is not None and path not in broken and not ok(value):
            bad(path, f"{message}, found {value!r}")

    positive = lambda v: v > 0  # noqa: E731
    finite_positive = lambda v: math.isfinite(v) and v > 0  # noqa: E731

    if isinstance(spec.name, str):
        need("name", spec.name, lambda v: v.strip() != "" and "/" not in v and "\\" not in v,
             "expected a non-empty name without slashes (it names run folders)")

    m = spec.model or schema.ModelSpec(name_or_path=None)  # None: the section itself failed its type check
    need("model.name_or_path", m.name_or_path, lambda v: v.strip() != "", "expected a model id or path")
    need("model.query_max_len", m.query_max_len, positive, "expected a positive length")
    need("model.passage_max_len", m.passage_max_len, positive, "expected a positive length")
    need("model.dropout", m.dropout, lambda v: 0 <= v < 1, "expected a probability in [0, 1)")

    d = spec.data or schema.DataSpec(sources=None)
    if isinstance(d.sources, list):
        if not d.sources and "data.sources" not in broken:
            bad("data.sources", "expected at least one training source")
        for i, s in enumerate(d.sources):
            if s is None:
                continue
            need(f"data.sources[{i}].weight", s.weight, finite_positive, "expected a weight > 0")
            _check_source_format(s, f"data.sources[{i}]", bad, need, broken)
            key = f"data.sources[{i}].path"
            if not isinstance(s.path, str) or key in broken or is_hub_id(s.path):
                continue
            if not Path(s.path).exists():
                missing(key, f"file {s.path} does not exist")
            elif (Path(s.path).is_file() and Path(s.path).suffix.lower() not in FILE_FORMATS
                  and not (isinstance(s.file_type, str) and f"data.sources[{i}].file_type" not in broken)):
                bad(key, f"unknown file type '{Path(s.path).suffix}' ({s.path}); expected one of "
                         f"{', '.join(FILE_FORMATS)}, a directory of them, a save_to_disk directory or hub:owner/name "
                         "(or set the source's file_type: to read it as one of them)")
    need("data.hard_negatives", d.hard_negatives, lambda v: v >= 0, "expected 0 or more")
    need("data.prefetch", d.prefetch, lambda v: v >= 0, "expected 0 (build each batch when its step starts) or more")
    need("data.mixing_temperature", d.mixing_temperature, finite_positive, "expected a temperature > 0")

    need("loss.temperature", spec.loss.temperature, finite_positive, "expected a temperature > 0")
    _check_guide(spec.loss, bad, need, missing, broken)
    _check_matryoshka(spec, bad, broken)
    _check_distill(spec, bad, need, broken)

    t = spec.train
    if t.max_steps is None and t.epochs is None and "train.max_steps" not in broken and "train.epochs" not in broken:
        bad("train.max_steps", "set train.max_steps or train.epochs; otherwise training never stops")
    need("train.max_steps", t.max_steps, positive, "expected a positive number of steps")
    need("train.epochs", t.epochs, finite_positive, "expected a positive number of epochs")
    need("train.batch_size", t.batch_size, positive, "expected a positive batch size")
    need("train.lr", t.lr, finite_positive, "expected a learning rate > 0")
    need("train.weight_decay", t.weight_decay, lambda v: v >= 0, "expected 0 or more")
    need("train.adam_eps", t.adam_eps, lambda v: v > 0, "expected a positive number")
    need("train.save_every", t.save_every, positive, "expected a positive number of steps (or null)")
    need("train.keep_checkpoints", t.keep_checkpoints, positive, "expected to keep at least 1 checkpoint")
    need("train.warmup_ratio", t.warmup_ratio, lambda v: 0 <= v < 1, "expected a fraction in [0, 1)")
    need("train.grad_clip", t.grad_clip, finite_positive, "expected a norm > 0 (or null to disable clipping)")
    need("train.log_every", t.log_every, positive, "expected a positive number of steps")

    nproc = spec.launch.nproc_per_node
    need("launch.nproc_per_node", nproc, positive, "expected 1 or more processes")
    nproc_ok = isinstance(nproc, int) and nproc > 0 and "launch.nproc_per_node" not in broken
    batch_ok = isinstance(t.batch_size, int) and t.batch_size > 0 and "train.batch_size" not in broken
    if spec.launch.backend == "local" and nproc_ok and nproc != 1:
        bad("launch.nproc_per_node", f"launch.backend 'local' runs one process, found nproc_per_node={nproc}; "
                                     "use backend auto, deepspeed or torchrun for more")
    nnodes = spec.launch.nnodes
    need("launch.nnodes", nnodes, positive, "expected 1 or more nodes")
    if nproc_ok and isinstance(nnodes, int) and nnodes > 0 and "launch.nnodes" not in broken:
        nproc = nproc * nnodes  # from here on: the world size
        if spec.launch.backend == "local" and nnodes > 1:
            bad("launch.nnodes", "launch.backend 'local' runs one process on one node; use deepspeed or torchrun")
    need("launch.master_port", spec.launch.master_port, lambda v: 0 < v < 65536, "expected a TCP port")
    if isinstance(spec.launch.hostfile, str) and not Path(spec.launch.hostfile).is_file():
        missing("launch.hostfile", f"hostfile {spec.launch.hostfile} does not exist")
    if nproc_ok and batch_ok and t.batch_size % nproc:
        bad("train.batch_size", f"the global batch {t.batch_size} must split evenly over the "
                                f"{nproc} processes (launch.nnodes x launch.nproc_per_node)")
    if t.compile is True and spec.deepspeed.zero_stage == 3:
        bad("train.compile", "train.compile cannot be used with deepspeed.zero_stage 3: ZeRO-3 gathers each "
                             "parameter in hooks that break the compiled graph; use zero_stage 0-2 or compile: false")
    need("cache.chunk_size", spec.cache.chunk_size, positive, "expected a positive chunk size")
    need("cache.chunk_tokens", spec.cache.chunk_tokens, positive, "expected a positive token budget (or null)")
    if spec.cache.enabled and nproc_ok and batch_ok and isinstance(spec.cache.chunk_size, int):
        per_rank = t.batch_size // nproc
        if spec.cache.chunk_size > per_rank:
            bad("cache.chunk_size", f"chunk_size {spec.cache.chunk_size} is larger than the per-rank batch "
                                    f"{per_rank} (train.batch_size {t.batch_size} / {nproc} processes); "
                                    f"use at most {per_rank}")

    e = spec.eval
    if isinstance(e.k, list) and "eval.k" not in broken:
        if not e.k:
            bad("eval.k", "expected at least one cut-off")
        for i, k in enumerate(e.k):
            need(f"eval.k[{i}]", k, positive, "expected a positive cut-off")
        repeated = sorted({k for k in e.k if e.k.count(k) > 1 and k is not None})
        if repeated:
            bad("eval.k", f"cut-offs must be unique, {repeated} appear more than once")
    need("eval.batch_size", e.batch_size, positive, "expected a positive batch size")
    need("eval.query_max_len", e.query_max_len, positive, "expected a positive length (or null for the model's maximum)")
    need("eval.passage_max_len", e.passage_max_len, positive,
         "expected a positive length (or null for the model's maximum)")
    if isinstance(e.benchmarks, list):
        names = [b.name for b in e.benchmarks if b is not None]
        for i, b in enumerate(e.benchmarks):
            if b is None:
                continue
            if isinstance(b.name, str) and names.count(b.name) > 1:
                bad(f"eval.benchmarks[{i}].name", f"benchmark name {b.name!r} is used twice; names label results")
            if isinstance(b.path, str) and f"eval.benchmarks[{i}].path" not in broken and not Path(b.path).is_dir():
                missing(f"eval.benchmarks[{i}].path", f"benchmark directory {b.path} does not exist (expected "
                                                      "BEIR layout: corpus.jsonl, queries.jsonl, qrels/test.tsv)")

    _check_eval_during(spec, bad, need, broken)
    if isinstance(e.dims, list) and "eval.dims" not in broken:  # whether each fits the model: checks.py
        if not e.dims:
            bad("eval.dims", "expected at least one width (or null for loss.matryoshka_dims)")
        for i, dim in enumerate(e.dims):
            need(f"eval.dims[{i}]", dim, positive, "expected a positive width")
        if len(set(e.dims)) != len(e.dims):
            bad("eval.dims", f"each width at most once, found {e.dims}")

    # Invalid on every machine, so the dry run refuses it too (what depends on this machine's devices is
    # check_devices', which a spec meant for elsewhere skips).
    if t.device == "cpu" and t.precision == "fp16" and "train.device" not in broken:
        bad("train.precision", "fp16 needs a CUDA GPU and train.device is cpu; use fp32 or bf16 on the CPU")

    _check_deepspeed(spec, bad, broken, nproc if nproc_ok else 1)


def _check_guide(loss: schema.LossSpec, bad: Callable[[str, str], None], need: Callable, missing: Callable,
                 broken: _Broken) -> None:
    """loss.guide_*: the guide's own keys do nothing without loss.guide_model, so setting them alone is an
    error; the margin's range depends on its strategy; `queries` exists only in symmetric_infonce. Whether
    the guide shares the model's tokenizer needs its tokenizer files: koe5/orchestrate/checks.py."""
    guide = loss.guide_model
    if "loss.guide_model" in broken:
        return
    if guide is None:
        for key, value, default in (("guide_margin", loss.guide_margin, 0.0),
                                    ("guide_margin_strategy", loss.guide_margin_strategy, "absolute"),
                                    ("guide_mask", loss.guide_mask, None)):
            if value != default and f"loss.{key}" not in broken:
                bad(f"loss.{key}", "only used with loss.guide_model (guided false-negative filtering), which is "
                                   "null; set loss.guide_model or remove this key")
        return
    need("loss.guide_model", guide, lambda v: v.strip() != "", "expected a model id or path")
    if guide.startswith(("/", "./", "../", "~")) and not Path(guide).expanduser().is_dir():
        missing("loss.guide_model", f"guide model directory {guide} does not exist")
    if loss.guide_margin_strategy == "relative":
        need("loss.guide_margin", loss.guide_margin, lambda v: 0 <= v < 1,
             "expected a relative margin in [0, 1) (a fraction of the positive's guide score)")
    elif loss.guide_margin_strategy == "absolute":
        need("loss.guide_margin", loss.guide_margin, lambda v: 0 <= v < 2,
             "expected an absolute margin in [0, 2) (a difference of cosine scores)")
    mask = loss.guide_mask
    if isinstance(mask, list) and "loss.guide_mask" not in broken:
        if not mask:
            bad("loss.guide_mask", "expected at least one kind of candidate to mask (or null for all); "
                                   "to mask nothing, set loss.guide_model to null")
        elif len(set(mask)) != len(mask):
            bad("loss.guide_mask", f"each kind at most once, found {mask}")
        elif "queries" in mask and loss.name == "infonce":
            bad("loss.guide_mask", "`queries` are candidates only in loss.name symmetric_infonce; "
                                   "loss.name is infonce")


def _check_distill(spec: schema.Spec, bad: Callable[[str, str], None], need: Callable, broken: _Broken) -> None:
    """loss.distill_*: the KL term needs teacher scores (some source's fields.scores) and a candidate besides
    the positive (data.hard_negatives >= 1); its temperature does nothing without it."""
    loss = spec.loss
    need("loss.distill_weight", loss.distill_weight, lambda v: math.isfinite(v) and v >= 0,
         "expected a weight >= 0 (0 or null = no distillation)")
    need("loss.distill_temperature", loss.distill_temperature, lambda v: math.isfinite(v) and v > 0,
         "expected a temperature > 0")
    on = isinstance(loss.distill_weight, (int, float)) and loss.distill_weight > 0 \
        and "loss.distill_weight" not in broken
    if not on:
        if loss.distill_temperature != 1.0 and "loss.distill_temperature" not in broken:
            bad("loss.distill_temperature", "only used with loss.distill_weight > 0 (score distillation), which is "
                                            "off; set loss.distill_weight or remove this key")
        return
    sources = spec.data.sources if spec.data and isinstance(spec.data.sources, list) else []
    if not any(s is not None and isinstance(s.fields, schema.FieldsSpec) and s.fields.scores for s in sources):
        bad("loss.distill_weight", "score distillation needs teacher scores, but no source of data.sources maps "
                                   "a scores column (set a source's fields.scores, or loss.distill_weight to null)")
    hard = spec.data.hard_negatives if spec.data else None
    if isinstance(hard, int) and hard == 0 and "data.hard_negatives" not in broken:
        bad("loss.distill_weight", "the KL term compares a query's positive with its hard negatives, and "
                                   "data.hard_negatives is 0; set data.hard_negatives >= 1")


def _check_matryoshka(spec: schema.Spec, bad: Callable[[str, str], None], broken: _Broken) -> None:
    """loss.matryoshka_*: positive, distinct widths, one positive weight each. Whether a width fits the model
    needs its config (koe5/orchestrate/checks.py, before any weight loads)."""
    dims, weights = spec.loss.matryoshka_dims, spec.loss.matryoshka_weights
    if "loss.matryoshka_dims" in broken or "loss.matryoshka_weights" in broken:
        return
    if dims is None:
        if weights is not None:
            bad("loss.matryoshka_weights", "only used with loss.matryoshka_dims, which is null; set the widths "
                                           "or remove this key")
        return
    if not dims:
        bad("loss.matryoshka_dims", "expected at least one width (or null for the full embeddings only)")
        return
    for i, dim in enumerate(dims):
        if dim is not None and dim <= 0:
            bad(f"loss.matryoshka_dims[{i}]", f"expected a positive width, found {dim}")
    if len(set(dims)) != len(dims):
        bad("loss.matryoshka_dims", f"each width at most once, found {dims}")
    if spec.model is not None and spec.model.normalize is False and "model.normalize" not in broken:
        bad("loss.matryoshka_dims", "truncated embeddings are renormalized (cosine scores), so the full width "
                                    "must be normalized too; set model.normalize true")
    if weights is not None:
        if len(weights) != len(dims):
            bad("loss.matryoshka_weights", f"expected one weight per width of loss.matryoshka_dims ({len(dims)}), "
                                           f"found {len(weights)}")
        for i, w in enumerate(weights):
            if w is not None and not (math.isfinite(w) and w > 0):
                bad(f"loss.matryoshka_weights[{i}]", f"expected a weight > 0, found {w}")
def during_benchmarks(spec: schema.Spec) -> list[str]:
    """Names of the benchmarks evaluated during training: eval.during, else all of eval.benchmarks."""
    return list(spec.eval.during) or [b.name for b in spec.eval.benchmarks]


def split_metric(text: str) -> tuple[str, int] | None:
    """'ndcg@10' -> ('ndcg', 10); None when it is not NAME@K with a known metric name."""
    from koe5.eval.metrics import METRICS

    name, _, k = text.strip().lower().partition("@")
    return (name, int(k)) if name in METRICS and k.isdigit() and int(k) > 0 else None


def _check_eval_during(spec: schema.Spec, bad: Callable[[str, str], None], need: Callable, broken: _Broken) -> None:
    """eval.every, eval.during and train.keep_best: every name they use must exist in eval.benchmarks / eval.k."""
    e, keep = spec.eval, spec.train.keep_best
    if not isinstance(e.benchmarks, list) or "eval.benchmarks" in broken or not isinstance(e.during, list):
        return
    need("eval.every", e.every, lambda v: v > 0, "expected a positive number of steps (or null)")
    names = [b.name for b in e.benchmarks if b is not None and isinstance(b.name, str)]
    if e.every is not None and not names:
        bad("eval.every", "evaluation during training needs a benchmark: add one to eval.benchmarks")
    for i, name in enumerate(e.during):
        if isinstance(name, str) and name not in names:
            bad(f"eval.during[{i}]", f"no benchmark named {name!r} in eval.benchmarks (names: "
                                    f"{', '.join(names) or 'none'})." + did_you_mean(name, names))
    if keep is None:  # the section itself failed its type check
        return
    need("train.keep_best.patience", keep.patience, lambda v: v > 0,
         "expected a positive number of evaluations (or null for no early stopping)")
    if keep.patience is not None and keep.metric is None and "train.keep_best.metric" not in broken:
        bad("train.keep_best.patience", "early stopping watches train.keep_best.metric: set it (e.g. ndcg@10)")
    if keep.metric is None or "train.keep_best.metric" in broken:
        return
    if e.every is None:
        bad("train.keep_best.metric", "picking the best step needs evaluation during training: set eval.every")
    during = during_benchmarks(spec)
    if isinstance(keep.benchmark, str) and keep.benchmark not in during:
        where = "eval.during" if e.during else "eval.benchmarks"
        bad("train.keep_best.benchmark", f"{keep.benchmark!r} is not evaluated during training ({where}: "
                                         f"{', '.join(during) or 'none'})." + did_you_mean(keep.benchmark, during))
    if isinstance(keep.metric, str):
        parsed = split_metric(keep.metric)
        if parsed is None:
            from koe5.eval.metrics import METRICS

            bad("train.keep_best.metric", f"expected NAME@K with NAME one of {', '.join(METRICS)}, e.g. ndcg@10, "
                                          f"found {keep.metric!r}")
        elif isinstance(e.k, list) and "eval.k" not in broken and parsed[1] not in e.k:
            bad("train.keep_best.metric", f"{keep.metric!r} needs k={parsed[1]} in eval.k (which is {e.k})")


def _check_source_format(s: schema.SourceSpec, at: str, bad: Callable[[str, str], None], need: Callable,
                         broken: _Broken) -> None:
    """The keys a source's format needs, and no key its format would ignore (a key that silently does
    nothing is a mistake the user cannot see). Formats are described in koe5/data/formats.py."""
    from koe5.data.formats import LABEL_CLASSES

    if isinstance(s.encoding, str) and f"{at}.encoding" not in broken:
        try:
            codecs.lookup(s.encoding)
        except LookupError:
            bad(f"{at}.encoding", f"unknown text encoding {s.encoding!r} (e.g. utf-8, cp949, euc-kr)")
    if isinstance(s.columns, list) and f"{at}.columns" not in broken:
        kind = s.file_type or (FILE_FORMATS.get(Path(s.path).suffix.lower()) if isinstance(s.path, str) else None)
        if not s.columns:
            bad(f"{at}.columns", "expected the column names (or null when the file's first row is its header)")
        elif len(set(s.columns)) != len(s.columns):
            bad(f"{at}.columns", f"column names must be unique, found {s.columns}")
        elif kind in ("jsonl", "json", "parquet") or s.format == "squad":
            what = "format squad" if s.format == "squad" else kind
            bad(f"{at}.columns", f"only for CSV/TSV files without a header row; this source is {what}")
    fmt = s.format if isinstance(s.format, str) and f"{at}.format" not in broken else None
    fields = s.fields if isinstance(s.fields, schema.FieldsSpec) else schema.FieldsSpec()
    labels = s.labels if isinstance(s.labels, dict) and f"{at}.labels" not in broken else {}
    if fmt is None:
        return

    def only(key: str, value: Any, formats: tuple[str, ...]) -> None:
        if value not in (None, {}) and fmt not in formats and f"{at}.{key}" not in broken:
            bad(f"{at}.{key}", f"only used by format {' and '.join(formats)}; this source's format is {fmt}")

    only("min_score", s.min_score, ("scored_pairs",))
    only("group_size", s.group_size, ("paraphrase",))
    only("fields.group", fields.group, ("paraphrase",))
    only("fields.scores", fields.scores, ("triples",))
    if fmt == "triples" and fields.scores and fields.hard_negative is None and f"{at}.fields.scores" not in broken:
        bad(f"{at}.fields.scores", "teacher scores rank a row's positive against its hard negatives, and "
                                   "fields.hard_negative is null; map the hard negatives' column too")
    only("labels", labels, tuple(LABEL_CLASSES))
    if fmt == "squad" and s.file_type not in (None, "json"):
        bad(f"{at}.file_type", f"format squad reads SQuAD JSON; file_type must be json or null, found {s.file_type!r}")
    if fmt == "scored_pairs" and s.min_score is None and f"{at}.min_score" not in broken:
        bad(f"{at}.min_score", "needed by format scored_pairs: the least score that makes a pair a positive")
    need(f"{at}.min_score", s.min_score, math.isfinite, "expected a finite score")
    if fmt == "paraphrase" and f"{at}.group_size" not in broken:
        if (s.group_size is None) == (fields.group is None):
            bad(f"{at}.group_size", "format paraphrase needs exactly one of group_size (that many consecutive "
                                    "records per group) or fields.group (a column naming each record's group)")
        need(f"{at}.group_size", s.group_size, lambda v: v >= 2, "expected a group of 2 or more")
    if fmt in LABEL_CLASSES:
        classes = LABEL_CLASSES[fmt]
        seen: dict[str, str] = {}
        for cls, values in labels.items():
            key = f"{at}.labels.{cls}"
            if cls not in classes:
                bad(key, f"format {fmt} has no label class {cls!r}; its classes are {', '.join(classes)}")
                continue
            values = values if isinstance(values, list) else [values]
            if not values or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in values):
                bad(key, f"expected a label value (text or number) or a list of them, found {values!r}")
                continue
            for v in values:
                if str(v).strip() in seen and seen[str(v).strip()] != cls:
                    bad(key, f"label {str(v)!r} is also listed under {seen[str(v).strip()]}")
                seen[str(v).strip()] = cls
        first = classes[0]
        if (fmt == "pairs" or labels) and first not in labels:
            bad(f"{at}.labels.{first}", f"needed by format {fmt}: the label value(s) that make a "
                                        f"{'pair a positive' if fmt == 'pairs' else 'hypothesis an entailment'}"
                                        + (" (e.g. [\"1\"]; check which value the dataset uses)" if fmt == "pairs" else ""))
    h = s.holdout
    if isinstance(h, schema.HoldoutSpec):
        need(f"{at}.holdout.fraction", h.fraction, lambda v: 0 <= v < 1, "expected a fraction in [0, 1)")
        if h.side == "bench" and h.fraction == 0:
            bad(f"{at}.holdout.side", "side bench reads the held-out units, but holdout.fraction is 0 (no split); "
                                      "set a fraction > 0")
    m = s.mine
    if isinstance(m, schema.MineSpec):
        need(f"{at}.mine.negatives", m.negatives, lambda v: v >= 0, "expected 0 (no mining) or more negatives")
        need(f"{at}.mine.ranks", m.ranks, lambda v: len(v) == 2 and 1 <= v[0] <= v[1],
             "expected [first, last] with 1 <= first <= last, e.g. [3, 50]")
        need(f"{at}.mine.margin", m.margin, lambda v: 0 < v <= 1, "expected a relative margin in (0, 1], e.g. 0.95")
        need(f"{at}.mine.margin_abs", m.margin_abs, lambda v: v >= 0,
             "expected a non-negative score difference (or null to use mine.margin)")
        need(f"{at}.mine.batch_size", m.batch_size, lambda v: v > 0, "expected a positive batch size")


def _check_deepspeed(spec: schema.Spec, bad: Callable[[str, str], None], broken: _Broken, world: int) -> None:
    extra = spec.deepspeed.extra
    if not isinstance(extra, dict) or "deepspeed.extra" in broken:
        return
    stage = spec.deepspeed.zero_stage
    for key, min_stage in (("offload_optimizer", 1), ("offload_params", 3)):
        if getattr(spec.deepspeed, key) is True and isinstance(stage, int) and stage < min_stage:
            bad(f"deepspeed.{key}", f"{key} needs deepspeed.zero_stage >= {min_stage}, found zero_stage {stage}")
    zero = extra.get("zero_optimization") if isinstance(extra.get("zero_optimization"), dict) else {}
    for key, min_stage in (("offload_optimizer", 1), ("offload_param", 3)):
        offload = zero.get(key)
        active = offload is not None and not (isinstance(offload, dict) and offload.get("device", "cpu") == "none")
        if active and isinstance(stage, int) and stage < min_stage:
            bad(f"deepspeed.extra.zero_optimization.{key}",
                f"{key} needs deepspeed.zero_stage >= {min_stage}, found zero_stage {stage}")
    if all(p not in broken for p in ("train.batch_size", "train.grad_clip", "train.precision", "deepspeed.zero_stage")):
        if isinstance(spec.train.batch_size, int) and spec.train.batch_size > 0:
            for path, want, got in conflicts(derived_config(spec, world), extra):
                bad(f"deepspeed.extra.{path}", f"{got!r} contradicts the value koe5 derives from the spec "
                                               f"({want!r}); set it through the spec key instead (docs/spec.md)")


# ---------------------------------------------------------------- the machine

def device_info() -> tuple[int, bool]:
    """(CUDA devices visible, whether they support bf16). Imports torch, so it is only called when needed;
    tests replace it."""
    import torch

    if not torch.cuda.is_available():
        return 0, False
    return torch.cuda.device_count(), bool(torch.cuda.is_bf16_supported())


def check_devices(spec: schema.Spec, errors: Errors, warnings: list[str], origins: Origins) -> None:
    """Precision and process count against the hardware of this machine."""
    t, nproc = spec.train, spec.launch.nproc_per_node
    needs_gpu_facts = t.device in ("cuda", "auto") and (t.precision != "fp32" or nproc > 1 or t.device == "cuda"
                                                         or spec.model.attention == "varlen")
    cuda_count, bf16_ok = device_info() if needs_gpu_facts else (0, False)
    device = "cuda" if t.device == "cuda" or (t.device == "auto" and cuda_count) else "cpu"
    lab = lambda p: label_for(p, origins)  # noqa: E731
    if t.device == "cuda" and cuda_count == 0:
        errors.append(("train.device", f"{lab('train.device')}cuda was asked for but this machine has no usable "
                                       "CUDA device; use train.device=cpu or auto"))
        return
    if device == "cpu":
        auto = " (train.device auto found no CUDA device)" if t.device == "auto" else ""
        if t.precision == "fp16" and t.device == "auto":  # with device cpu, check_rules already refused it
            errors.append(("train.precision", f"{lab('train.precision')}fp16 needs a CUDA GPU and training runs on "
                                              f"CPU here{auto}; use fp32 or bf16 on CPU"))
        elif t.precision == "bf16":
            warnings.append(f"train.precision: bf16 on CPU{auto}: bf16 autocast runs on the CPU; "
                            "it works, but is usually slower than fp32 there and its numbers differ from a GPU run")
        if spec.model.attention == "varlen":
            warnings.append(f"model.attention: varlen on CPU{auto}: the varlen kernel is GPU-only, so attention "
                            "runs a block-diagonal-mask reference over the packed tokens (correct, but slower "
                            "than padded; meant for tests)")
        cpus = os.cpu_count() or 1
        if nproc > cpus:
            errors.append(("launch.nproc_per_node", f"{lab('launch.nproc_per_node')}{nproc} CPU processes (gloo) "
                                                    f"requested but this machine has {cpus} CPUs{auto}"))
        return
    if spec.model.attention == "varlen" and t.precision == "fp32":
        errors.append(("model.attention", f"{lab('model.attention')}varlen runs FlashAttention's varlen kernel, "
                                          "which takes bf16 or fp16 only, and training runs on the GPU in fp32; "
                                          "set train.precision: bf16 (or keep model.attention: padded)"))
    if t.precision == "bf16" and not bf16_ok:
        errors.append(("train.precision", f"{lab('train.precision')}bf16 is not supported by this GPU; use fp16 "
                                          "or fp32"))
    if nproc > cuda_count:
        errors.append(("launch.nproc_per_node", f"{lab('launch.nproc_per_node')}{nproc} processes requested but "
                                                f"only {cuda_count} CUDA device(s) are visible"))
