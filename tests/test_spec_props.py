"""Property tests: resolve -> dump -> resolve is the identity; the hash ignores layout, follows content."""

from __future__ import annotations

import json
import random
import re
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from koe5.spec import SpecError, expand, load_frozen
from koe5.spec.diff import flatten

TEXT = st.text(alphabet="abcxyz 가나다한국어-_:#'\"", max_size=10)
FILES = ("a.jsonl", "b.jsonl", "c.jsonl")


@st.composite
def specs(draw) -> dict:
    """A random valid spec: every section optional, values drawn within their rules."""
    batch = draw(st.sampled_from([8, 16, 32, 64]))
    nproc = draw(st.sampled_from([1, 2]))
    d = {
        "name": draw(st.text(alphabet="abc가나다-_", min_size=1, max_size=8)),
        "model": draw(st.fixed_dictionaries({"name_or_path": st.just("builtin:tiny-ko-bert")}, optional={
            "pooling": st.sampled_from(["mean", "cls"]), "normalize": st.booleans(), "query_prefix": TEXT,
            "query_max_len": st.integers(1, 512), "dropout": st.none() | st.floats(0, 0.9)})),
        "data": {"sources": draw(st.lists(st.fixed_dictionaries({"path": st.sampled_from(FILES)}, optional={
            "weight": st.floats(0.01, 100), "name": st.none() | TEXT}), min_size=1, max_size=3))},
        "train": draw(st.fixed_dictionaries({"batch_size": st.just(batch), "max_steps": st.integers(1, 10**6)}, optional={
            "lr": st.floats(1e-7, 1e-2), "precision": st.sampled_from(["fp32", "bf16", "fp16"]),
            "scheduler": st.sampled_from(["linear", "cosine", "constant"]), "epochs": st.none() | st.floats(0.1, 10)})),
        "launch": {"nproc_per_node": nproc},
        "cache": {"chunk_size": draw(st.integers(1, batch // nproc)), "enabled": draw(st.booleans())},
    }
    d.update(draw(st.fixed_dictionaries({}, optional={
        "seed": st.integers(0, 2**31), "tags": st.lists(TEXT, max_size=3),
        "loss": st.fixed_dictionaries({}, optional={"temperature": st.floats(0.001, 1), "mask_duplicates": st.booleans()}),
        "eval": st.fixed_dictionaries({}, optional={"k": st.sets(st.integers(1, 100), min_size=1, max_size=4).map(sorted)}),
        "deepspeed": st.fixed_dictionaries({}, optional={"zero_stage": st.sampled_from([0, 1, 2, 3]),
                                                         "extra": st.just({"zero_allow_untested_optimizer": True})}),
    })))
    return d


def make_files(root: Path, seed: str = "") -> None:
    for name in FILES:
        (root / name).write_text(json.dumps({"query": name + seed, "document": "문서", "hard_negative": "x"}) + "\n",
                                 encoding="utf-8")


def resolve(root: Path, text: str, name: str = "spec.yaml", overrides=()):
    f = root / name
    f.write_text(text, encoding="utf-8")
    [rs] = expand(f, overrides, check_devices=False)
    return rs


def shuffled(value, rnd: random.Random):
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        return {k: shuffled(v, rnd) for k, v in items}
    if isinstance(value, list):
        return [shuffled(v, rnd) for v in value]
    return value


def with_comments(text: str, rnd: random.Random) -> str:
    out = ["# a comment at the top"]
    for line in text.splitlines():
        out.append(line + ("   # trailing comment" if rnd.random() < 0.3 and not line.rstrip().endswith(("|", ">")) else ""))
        if rnd.random() < 0.2:
            out.append(rnd.choice(["", "# 주석", "   "]))
    return "\n".join(out) + "\n"


# database=None: no .hypothesis/ folder in the repository.
PROPS = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(specs())
def test_resolve_dump_resolve_is_identity(d):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_files(root)
        rs = resolve(root, yaml.safe_dump(d, allow_unicode=True, sort_keys=False))
        (root / "elsewhere").mkdir()
        again = resolve(root / "elsewhere", rs.to_yaml())
        assert again.data == rs.data and again.spec == rs.spec and again.spec_hash == rs.spec_hash
        frozen = load_frozen(rs.freeze(root / "frozen.yaml"))
        assert frozen.data == rs.data and frozen.spec_hash == rs.spec_hash


@PROPS
@given(specs(), st.randoms(use_true_random=False), st.sampled_from([2, 4]), st.booleans())
def test_hash_ignores_key_order_comments_and_layout(d, rnd, indent, flow):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_files(root)
        plain = resolve(root, yaml.safe_dump(d, allow_unicode=True), "plain.yaml")
        text = yaml.safe_dump(shuffled(d, rnd), allow_unicode=True, sort_keys=False, indent=indent,
                              default_flow_style=flow, width=10**6)
        if not flow:
            text = with_comments(text, rnd)
        assert resolve(root, text, "fancy.yaml").spec_hash == plain.spec_hash


# Source keys that only a particular format accepts: the mutation sets the format along with the key.
FORMAT_KEYS = {"min_score": {"format": "scored_pairs", "min_score": 0.5},
               "group_size": {"format": "paraphrase", "group_size": 3},
               "fields.group": {"format": "paraphrase", "fields": {"group": "g"}},
               "labels": {"format": "pairs", "labels": {"positive": ["1"]}},
               "columns": {"file_type": "csv", "columns": ["q", "d"]},
               "holdout.side": {"holdout": {"fraction": 0.5, "side": "bench"}},
               # one item of a list: an override replaces the list whole
               "mine.ranks[0]": {"mine": {"ranks": [2, 50]}}, "mine.ranks[1]": {"mine": {"ranks": [3, 20]}}}
SOURCE_VALUES = {"format": "squad", "encoding": "cp949", "file_type": "jsonl", "holdout.fraction": 0.5,
                 "mine.margin_abs": 0.05, "mine.first": "mined",
                 "mine.model": "other-model"}


GUIDE_AND_MATRYOSHKA = {
    "loss.guide_margin": {"guide_model": "g", "guide_margin": 0.25},
    "loss.guide_margin_strategy": {"guide_model": "g", "guide_margin_strategy": "relative"},
    "loss.guide_mask": {"guide_model": "g", "guide_mask": ["in_batch"]},
    "loss.matryoshka_dims": {"matryoshka_dims": [8, 16]},
    "loss.matryoshka_weights": {"matryoshka_dims": [8, 16], "matryoshka_weights": [1.0, 0.5]},
}
NEED_A_BENCHMARK = {"eval.every", "eval.during", "train.keep_best.metric", "train.keep_best.benchmark",
                    "train.keep_best.patience"}
# Valid only beside keys of another section, which one override cannot change together (distillation needs a
# source with teacher scores; this test's spec runs ZeRO-3, which train.compile refuses): changed in
# test_two_section_keys_change_the_hash below.
NEED_ANOTHER_SECTION = {"loss.distill_weight", "loss.distill_temperature", "train.compile"}


def mutation(path: str, value, data: dict) -> str | None:
    """An override that sets `path` to a different valid value, or None for keys changed elsewhere."""
    if path.endswith(".path") and path.startswith(("data.", "eval.")):
        return None  # content, not path, is hashed: tested with file edits
    source_key = re.fullmatch(r"data\.sources\[(\d+)\]\.(.+)", path)
    if source_key and source_key[2] in FORMAT_KEYS:  # keys that need their format: change the whole source
        i = int(source_key[1])
        return f"data.sources[{i}]={json.dumps(dict(data['data']['sources'][i], **FORMAT_KEYS[source_key[2]]))}"
    if source_key and source_key[2] in SOURCE_VALUES:
        return f"{path}={json.dumps(SOURCE_VALUES[source_key[2]])}"
    if path in GUIDE_AND_MATRYOSHKA:  # valid only beside loss.guide_model / loss.matryoshka_dims: change the section
        return f"loss={json.dumps(dict(data['loss'], **GUIDE_AND_MATRYOSHKA[path]))}"
    if path in NEED_A_BENCHMARK:  # this spec has no benchmark (tests/test_eval_during_training.py covers them)
        return None
    if path in NEED_ANOTHER_SECTION:
        return None
    if path == "launch.nproc_per_node":
        new = 2 if value == 1 else 1
    elif path == "cache.chunk_size":
        new = value - 1 if value > 1 else 2
    elif path == "train.batch_size":
        new = value * 2
    elif isinstance(value, bool):
        new = not value
    elif path == "deepspeed.zero_stage":
        new = (value + 1) % 4
    elif path in ("model.pooling", "train.precision", "train.scheduler", "train.device", "launch.backend",
                  "data.mixing", "data.leakage", "data.on_error", "data.positive", "model.attention", "eval.dtype"):
        choices = {"model.pooling": ["mean", "cls"], "train.precision": ["fp32", "bf16", "fp16"],
                   "model.attention": ["padded", "varlen"], "eval.dtype": ["fp32", "bf16"],
                   "train.scheduler": ["linear", "cosine", "constant"], "train.device": ["auto", "cpu", "cuda"],
                   "launch.backend": ["auto", "deepspeed", "torchrun"],
                   "data.mixing": ["proportional", "weighted", "temperature"],
                   "data.leakage": ["error", "warn", "ignore"], "data.on_error": ["error", "skip"],
                   "data.positive": ["first", "sample"]}[path]
        new = choices[(choices.index(value) + 1) % len(choices)] if value in choices else choices[0]
    elif path == "loss.name":
        new = "symmetric_infonce" if value == "infonce" else "infonce"
    elif isinstance(value, int):
        new = value + 1
    elif isinstance(value, float):
        new = value / 2 if 0 < value < 1 else value * 2 if value else 0.5
    elif isinstance(value, str):
        return f"{path}={value}x"
    elif value is None:
        new = {"model.dropout": 0.1, "train.max_steps": 7, "train.epochs": 2.0, "train.grad_clip": 1.0,
               "registry.path": "r.duckdb", "cache.chunk_tokens": 4096, "train.save_every": 100,
               "launch.hostfile": "hosts", "launch.master_port": 29501, "eval.query_max_len": 128,
               "eval.passage_max_len": 256, "eval.dims": [8]}.get(path, "named")
        if isinstance(new, str):
            return f"{path}={new}"
    elif value == [] and path == "tags":
        new = ["t"]
    elif value == [] and path == "train.report_to":
        new = ["tensorboard"]
    elif value == [] and path == "eval.benchmarks":
        return None
    elif value == {}:
        new = {"zero_allow_untested_optimizer": True}
    else:
        raise AssertionError(f"no mutation for {path}={value!r}")
    return f"{path}={json.dumps(new)}"


LOCATIONS = {"output_dir", "registry.path", "train.report_to"}  # where results go, not what runs


def test_every_value_changes_the_hash_except_locations(tmp_path):
    make_files(tmp_path)
    d = {"name": "all", "model": {"name_or_path": "m"}, "data": {"sources": [{"path": "a.jsonl"}]},
         "train": {"max_steps": 5}, "cache": {"chunk_size": 8}, "deepspeed": {"zero_stage": 3}}
    base = resolve(tmp_path, yaml.safe_dump(d))
    tried = set()
    for path, value in flatten(base.data).items():
        override = mutation(path, value, base.data)
        if override is None:
            continue
        changed = resolve(tmp_path, yaml.safe_dump(d), overrides=[override])
        assert changed.data != base.data, override
        assert (changed.spec_hash == base.spec_hash) == (path in LOCATIONS), override
        tried.add(path)
    untried = {p for p in flatten(base.data) if p not in tried}
    assert untried == {"data.sources[0].path", "eval.benchmarks"} | NEED_A_BENCHMARK | NEED_ANOTHER_SECTION


def test_two_section_keys_change_the_hash(tmp_path):
    """The keys of NEED_ANOTHER_SECTION, each changed beside the keys it needs."""
    make_files(tmp_path)
    d = {"name": "two", "model": {"name_or_path": "m"}, "train": {"max_steps": 5},
         "data": {"sources": [{"path": "a.jsonl", "fields": {"scores": "s"}}]},
         "loss": {"distill_weight": 1.0, "distill_temperature": 1.0}, "deepspeed": {"zero_stage": 2}}
    base = resolve(tmp_path, yaml.safe_dump(d))
    for override in ("loss.distill_weight=0.5", "loss.distill_temperature=2.0", "train.compile=true"):
        assert resolve(tmp_path, yaml.safe_dump(d), overrides=[override]).spec_hash != base.spec_hash, override


@PROPS
@given(specs(), st.data())
def test_any_value_change_changes_the_hash(d, data):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_files(root)
        text = yaml.safe_dump(d, allow_unicode=True)
        base = resolve(root, text)
        leaves = {p: v for p, v in flatten(base.data).items() if p.split("[")[0] not in LOCATIONS and p not in LOCATIONS}
        path = data.draw(st.sampled_from(sorted(leaves)))
        override = mutation(path, leaves[path], base.data)
        if override is None:
            return
        try:
            changed = resolve(root, text, overrides=[override])
        except SpecError:
            return  # the change broke a cross-field rule of this particular spec
        assert changed.spec_hash != base.spec_hash, override


@PROPS
@given(specs(), st.sampled_from(FILES), st.integers(0, 10**6), st.integers(1, 255))
def test_any_data_byte_changes_the_hash(d, victim, where, delta):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_files(root)
        text = yaml.safe_dump(d, allow_unicode=True)
        before = resolve(root, text)
        blob = bytearray((root / victim).read_bytes())
        blob[where % len(blob)] = (blob[where % len(blob)] + delta) % 256
        (root / victim).write_bytes(bytes(blob))
        after = resolve(root, text)
        used = victim in {Path(s["path"]).name for s in d["data"]["sources"]}
        assert (after.spec_hash != before.spec_hash) == used


JUNK = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True) | TEXT
                    | st.just("${train.lr}") | st.just("${nope}"),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6)


def _child(node, token):
    if isinstance(node, dict) and isinstance(token, str):
        return node.get(token)
    if isinstance(node, list) and isinstance(token, int) and token < len(node):
        return node[token]
    return None


@PROPS
@given(specs(), st.lists(st.tuples(st.sampled_from(sorted([
    "name", "model", "model.pooling", "model.dropout", "data", "data.sources", "data.sources[0]",
    "data.sources[0].weight", "train", "train.batch_size", "train.max_steps", "cache.chunk_size", "eval", "eval.k",
    "eval.benchmarks", "deepspeed.extra", "deepspeed.zero_stage", "launch", "sweep", "tags", "loss.temperature"])),
    JUNK), min_size=1, max_size=4))
def test_garbage_gives_spec_error_never_a_crash(d, junk):
    """Whatever the values, the loader answers with a resolved spec or a SpecError, never a traceback."""
    from koe5.spec.compose import parse_path

    for path, value in junk:
        node, tokens = d, parse_path(path)
        for t in tokens[:-1]:
            node = _child(node, t)
        if isinstance(node, dict) and isinstance(tokens[-1], str):
            node[tokens[-1]] = value
        elif isinstance(node, list) and isinstance(tokens[-1], int) and tokens[-1] < len(node):
            node[tokens[-1]] = value
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_files(root)
        try:
            resolve(root, yaml.safe_dump(d, allow_unicode=True))
        except SpecError as e:
            assert e.errors and all(isinstance(p, str) and isinstance(m, str) for p, m in e.errors)
