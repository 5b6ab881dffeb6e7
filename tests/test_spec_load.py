"""Loading specs: inheritance, paths, interpolation, overrides, sweeps, freezing, diff."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import pytest
import yaml

from koe5.spec import SpecError, expand, expand_text, load_frozen, spec_from_dict
from koe5.spec import commands, identity, validate


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    # Device facts are faked so results do not depend on the machine running the tests.
    monkeypatch.setattr(validate, "device_info", lambda: (0, False))


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def minimal(tmp_path: Path, **extra) -> Path:
    write(tmp_path / "train.jsonl", '{"query": "질문", "document": "문서", "hard_negative": "오답"}\n')
    spec = {"name": "m", "model": {"name_or_path": "builtin:tiny-ko-bert"},
            "data": {"sources": [{"path": "train.jsonl"}]}, "train": {"max_steps": 3}, **extra}
    return write(tmp_path / "spec.yaml", spec)


def test_minimal_spec_fills_defaults_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    [rs] = expand(minimal(tmp_path))
    assert rs.spec.model.pooling == "mean" and rs.spec.train.batch_size == 32 and rs.spec.eval.k == [1, 3, 5, 10]
    assert rs.data["data"]["sources"][0] == {"path": str(tmp_path / "train.jsonl"), "weight": 1.0, "name": None,
                                             "fields": {"query": "query", "document": "document",
                                                        "hard_negative": "hard_negative", "label": "label",
                                                        "score": "score", "group": None, "id": None,
                                                        "scores": None},
                                             "split": "train", "format": "triples", "encoding": "utf-8",
                                             "file_type": None, "columns": None, "labels": {}, "min_score": None,
                                             "group_size": None, "holdout": {"fraction": 0.0, "side": "train", "seed": 0},
                                             "mine": {"negatives": 0, "first": "own", "ranks": [3, 50], "margin": 0.95, "margin_abs": None,
                                                      "model": None, "batch_size": 64}}
    assert rs.data["output_dir"] == str(tmp_path / "runs")
    assert rs.sweep_values == {} and rs.source_path == tmp_path / "spec.yaml"
    assert len(rs.spec_hash) == 16 and int(rs.spec_hash, 16) >= 0
    assert "base" not in rs.data and "sweep" not in rs.data


def test_yaml12_floats(tmp_path):
    [rs] = expand(minimal(tmp_path), ["train.lr=3e-5"])
    assert rs.spec.train.lr == 3e-5
    write(tmp_path / "f.yaml", "base: spec.yaml\ntrain: {lr: 1E-4, weight_decay: 1}\n")
    [rs] = expand(tmp_path / "f.yaml")
    assert rs.spec.train.lr == 1e-4 and rs.spec.train.weight_decay == 1.0 and isinstance(rs.spec.train.weight_decay, float)


def test_inheritance_chain_paths_relative_to_their_file(tmp_path):
    minimal(tmp_path / "base")  # base/spec.yaml names base/train.jsonl as "train.jsonl"
    write(tmp_path / "mid" / "mid.yaml", {"base": "../base/spec.yaml", "train": {"lr": 1e-4}, "eval": {"k": [1, 2]}})
    write(tmp_path / "top.yaml", {"base": "mid/mid.yaml", "name": "top", "eval": {"k": [5]}})
    [rs] = expand(tmp_path / "top.yaml")
    assert rs.spec.name == "top" and rs.spec.train.lr == 1e-4 and rs.spec.train.max_steps == 3
    assert rs.spec.eval.k == [5]  # lists are replaced, not appended
    assert rs.spec.data.sources[0].path == str(tmp_path / "base" / "train.jsonl")


def test_interpolation(tmp_path, monkeypatch):
    monkeypatch.setenv("KOE5_TEST_TAG", "야간")
    f = minimal(tmp_path, cache={"chunk_size": "${train.batch_size}"}, tags=["bs${train.batch_size}", "${env:KOE5_TEST_TAG}",
                                                                       "${env:KOE5_UNSET_VAR,none}"])
    [rs] = expand(f, ["train.batch_size=16"])
    assert rs.spec.cache.chunk_size == 16 and isinstance(rs.spec.cache.chunk_size, int)
    assert rs.spec.tags == ["bs16", "야간", "none"]


def test_overrides_are_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = minimal(tmp_path)
    write(tmp_path / "more.jsonl", '{"query": "a", "document": "b", "hard_negative": "c"}\n')
    [rs] = expand(f, ["model.query_prefix=질의: ", "model.dropout=0.1", "eval.k=[1,5]", "name=123",
                      "data.sources[0].weight=2", "data.sources[1].path=more.jsonl", "model.dropout=null",
                      "deepspeed.extra.zero_allow_untested_optimizer=true"])
    assert rs.spec.model.query_prefix == "질의: " and rs.spec.model.dropout is None and rs.spec.name == "123"
    assert rs.spec.eval.k == [1, 5] and rs.spec.data.sources[0].weight == 2.0
    assert rs.spec.data.sources[1].path == str(tmp_path / "more.jsonl") and rs.spec.data.sources[1].weight == 1.0
    assert rs.spec.deepspeed.extra == {"zero_allow_untested_optimizer": True}


def test_override_paths_resolve_against_cwd(tmp_path, monkeypatch):
    f = minimal(tmp_path)
    write(tmp_path / "elsewhere" / "x.jsonl", '{"query": "a", "document": "b", "hard_negative": "c"}\n')
    monkeypatch.chdir(tmp_path / "elsewhere")
    [rs] = expand(f, ["data.sources[0].path=x.jsonl", "output_dir=out"])
    assert rs.spec.data.sources[0].path == str(tmp_path / "elsewhere" / "x.jsonl")
    assert rs.spec.output_dir == str(tmp_path / "elsewhere" / "out")


def test_sweep_grid(tmp_path):
    f = minimal(tmp_path, sweep={"train.batch_size": [32, 64], "loss.temperature": [0.02, 0.05]})
    specs = expand(f)
    assert [s.sweep_values for s in specs] == [
        {"train.batch_size": b, "loss.temperature": t} for b in (32, 64) for t in (0.02, 0.05)]
    assert [(s.spec.train.batch_size, s.spec.loss.temperature) for s in specs] == [
        (32, 0.02), (32, 0.05), (64, 0.02), (64, 0.05)]
    assert len({s.spec_hash for s in specs}) == 4
    # Each member is the same experiment as the plain spec with those values set.
    [single] = expand(minimal(tmp_path / "plain"), ["train.batch_size=64", "loss.temperature=0.05"])
    assert single.spec_hash == specs[3].spec_hash


def test_override_pins_a_swept_key(tmp_path):
    f = minimal(tmp_path, sweep={"train.batch_size": [32, 64], "loss.temperature": [0.02, 0.05]})
    specs = expand(f, ["train.batch_size=16", "cache.chunk_size=16"])
    assert len(specs) == 2 and {s.spec.train.batch_size for s in specs} == {16}
    assert len(expand(f, ["sweep.seed=[1,2,3]"])) == 12


def test_sweep_of_list_item(tmp_path):
    f = minimal(tmp_path, sweep={"data.sources[0].weight": [1, 2]})
    assert [s.spec.data.sources[0].weight for s in expand(f)] == [1.0, 2.0]


def test_freeze_and_load_frozen(tmp_path, monkeypatch):
    f = minimal(tmp_path, sweep={"train.batch_size": [32, 64]})
    rs = expand(f)[1]
    frozen = rs.freeze(tmp_path / "run" / "spec.frozen.yaml")
    # Ranks never re-hash data or re-compose: make both impossible.
    monkeypatch.setattr("koe5.spec.load.fingerprint", lambda p: pytest.fail("re-hashed data"))
    monkeypatch.setattr("koe5.spec.load.load_chain", lambda p: pytest.fail("re-composed"))
    back = load_frozen(frozen)
    assert back.spec == rs.spec and back.data == rs.data and back.spec_hash == rs.spec_hash
    assert back.sweep_values == {"train.batch_size": 64}
    # A hand edit is caught.
    frozen.write_text(frozen.read_text().replace("batch_size: 64", "batch_size: 128"))
    with pytest.raises(SpecError, match="edited after freezing"):
        load_frozen(frozen)
    with pytest.raises(SpecError, match="not written by"):
        load_frozen(f)


def test_resolved_yaml_is_a_spec_with_the_same_hash(tmp_path):
    [rs] = expand(minimal(tmp_path, cache={"chunk_size": 8}))
    again = write(tmp_path / "other" / "resolved.yaml", rs.to_yaml())
    [rs2] = expand(again)
    assert rs2.data == rs.data and rs2.spec_hash == rs.spec_hash
    [rs3] = expand_text(rs.to_yaml(), ["seed=1"])
    assert rs3.spec.seed == 1 and rs3.spec_hash != rs.spec_hash


def test_hash_ignores_locations_but_not_content(tmp_path, monkeypatch):
    f = minimal(tmp_path)
    base = expand(f)[0].spec_hash
    assert expand(f, ["output_dir=/tmp/elsewhere", "registry.path=x.duckdb"])[0].spec_hash == base
    monkeypatch.chdir(tmp_path.parent)
    assert expand(f)[0].spec_hash == base  # cwd does not matter
    # Moving the data file keeps the hash; editing it does not.
    (tmp_path / "train.jsonl").rename(tmp_path / "moved.jsonl")
    assert expand(f, ["data.sources[0].path=" + str(tmp_path / "moved.jsonl")])[0].spec_hash == base
    (tmp_path / "moved.jsonl").write_text('{"query": "x", "document": "y", "hard_negative": "z"}\n')
    assert expand(f, ["data.sources[0].path=" + str(tmp_path / "moved.jsonl")])[0].spec_hash != base


def test_benchmark_directory_fingerprint(tmp_path):
    write(tmp_path / "bench" / "corpus.jsonl", '{"_id": "d1", "text": "문서"}\n')
    write(tmp_path / "bench" / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    f = minimal(tmp_path, eval={"benchmarks": [{"name": "b", "path": "bench"}]})
    h1 = expand(f)[0].spec_hash
    write(tmp_path / "bench" / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t2\n")
    assert expand(f)[0].spec_hash != h1
    assert identity.fingerprint(tmp_path / "bench").startswith("sha256:")


def test_deepspeed_config_from_resolved_spec(tmp_path):
    [rs] = expand(minimal(tmp_path, deepspeed={"zero_stage": 2, "extra": {"zero_optimization": {"stage": 2,
                  "overlap_comm": True}, "train_batch_size": 32}}))
    cfg = rs.deepspeed_config()
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": True} and cfg["train_batch_size"] == 32
    assert json.loads(json.dumps(rs.to_dict()))["deepspeed"] == cfg


def test_spec_from_dict_is_strict(tmp_path):
    [rs] = expand(minimal(tmp_path))
    assert spec_from_dict(rs.data) == rs.spec
    with pytest.raises(SpecError) as info:
        spec_from_dict({**rs.data, "sweep": {"seed": [1]}})
    assert info.value.errors[0][0] == "sweep"


# ---- koe5 spec ...

def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_spec_diff_files(tmp_path, capsys):
    a = minimal(tmp_path)
    b = write(tmp_path / "b.yaml", {"base": "spec.yaml", "train": {"lr": 1e-4}, "eval": {"k": [1, 10]}})
    assert run_cli("spec", "diff", str(a), str(b)) == 0
    out = capsys.readouterr().out
    assert "train.lr: 2e-05 -> 0.0001" in out and "eval.k[1]: 3 -> 10" in out and "eval.k[2]: 5 -> (absent)" in out
    assert "seed" not in out
    assert run_cli("spec", "diff", str(a), str(a), "--json") == 0
    assert json.loads(capsys.readouterr().out) == []


def test_spec_diff_run_id(tmp_path, capsys, monkeypatch):
    a = minimal(tmp_path)
    [rs] = expand(a, ["seed=7"])
    runs = {"abc123": {"spec_yaml": rs.to_yaml()}}

    class RegistryError(Exception):
        pass

    class FakeRegistry:
        def __init__(self, path):
            assert path == "reg.duckdb"

        def get_run(self, prefix):
            match = [dict(r, run_id=k) for k, r in runs.items() if k.startswith(prefix)]
            if not match:
                raise RegistryError(f"No run id starts with {prefix!r}")
            return match[0]

    fake = types.SimpleNamespace(Registry=FakeRegistry, RegistryError=RegistryError)
    monkeypatch.setitem(sys.modules, "koe5.registry", fake)
    assert run_cli("spec", "diff", str(a), "abc", "--registry", "reg.duckdb") == 0
    assert "seed: 0 -> 7" in capsys.readouterr().out
    assert run_cli("spec", "diff", str(a), "zzz", "--registry", "reg.duckdb") == 2
    assert "neither a spec file nor a run id: No run id" in capsys.readouterr().err


def test_spec_check_exit_status(tmp_path, capsys):
    f = minimal(tmp_path, sweep={"seed": [1, 2]})
    assert run_cli("spec", "check", str(f)) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert run_cli("spec", "check", str(f), "trian.lr=1") == 2
    err = capsys.readouterr().err
    assert "did you mean `train`" in err.lower() and "Traceback" not in err


def test_a_frozen_file_can_be_expanded_again_with_overrides(tmp_path):
    [rs] = expand(minimal(tmp_path))
    frozen = rs.freeze(tmp_path / "run" / "spec.yaml")
    [same] = expand(frozen)
    assert same.spec_hash == rs.spec_hash
    [varied] = expand(frozen, ["seed=2"])
    assert varied.spec.seed == 2 and varied.spec_hash != rs.spec_hash
