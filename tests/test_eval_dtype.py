"""eval.dtype: encoding with bf16 weights, and an embedding cache that never hands one dtype's embeddings to
an evaluation in the other. bf16 matmuls run on the CPU (slowly), so the tiny model shows it here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from koe5.encoder import load_encoder
from koe5.eval.benchmark import load_benchmark
from koe5.eval.model_eval import EncodeSettings, describe, evaluate_encoder, identity
from test_eval_benchmark import SAMPLE

TEXTS = ["서울은 대한민국의 수도이다.", "김치는 발효 음식이다.", "한강은 서울을 가로지른다.", "짧은 문장"]


def test_bf16_weights_encode_with_bfloat16_parameters_and_float32_output():
    fp32 = load_encoder("builtin:tiny-ko-bert")
    bf16 = load_encoder("builtin:tiny-ko-bert", dtype="bf16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    a = fp32.encode(TEXTS, "passage: ", 64)
    b = bf16.encode(TEXTS, "passage: ", 64)
    assert b.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)  # normalized in float32
    # bf16 keeps 8 bits of mantissa: the same embeddings to ~1e-3 (1.0e-3 at most on the sample), never
    # bit-identical
    assert np.abs(a - b).max() > 1e-5
    np.testing.assert_allclose(a, b, atol=1e-2)


class Spy:
    """Wraps an encoder's `encode`, keeping what each call returned (what a cache hit never calls)."""

    def __init__(self, encoder):
        self.calls: list[np.ndarray] = []
        inner = encoder.encode

        def encode(*args, **kwargs):
            out = inner(*args, **kwargs)
            self.calls.append(out)
            return out

        encoder.encode = encode


def test_the_embedding_cache_keeps_fp32_and_bf16_apart(tmp_path):
    """fp32, then bf16, then fp32 again, then bf16 again, over one cache directory: each dtype encodes once
    (queries and passages) and afterwards gets its own embeddings back, never the other's."""
    bench = load_benchmark(SAMPLE)
    settings = EncodeSettings("query: ", "passage: ", 32, 64, batch_size=32)
    cache = str(tmp_path / "emb")
    encoders = {d: load_encoder("builtin:tiny-ko-bert", dtype=d) for d in ("fp32", "bf16")}
    assert encoders["fp32"].fingerprint == encoders["bf16"].fingerprint  # same weights: only the dtype differs
    spies = {d: Spy(e) for d, e in encoders.items()}

    first = {}
    for dtype in ("fp32", "bf16"):
        [first[dtype]] = evaluate_encoder(encoders[dtype], [bench], [1, 10], settings, cache_dir=cache)
        assert len(spies[dtype].calls) == 2, f"{dtype} was served the other dtype's cached embeddings"
    assert len(list((tmp_path / "emb").glob("*.npy"))) == 4
    # the passages' cache file of each dtype holds that dtype's own encoding
    files = {tuple(np.load(f).ravel()[:8]) for f in (tmp_path / "emb").glob("*.npy")}
    for dtype in ("fp32", "bf16"):
        assert tuple(spies[dtype].calls[1].ravel()[:8]) in files

    for dtype in ("fp32", "bf16"):
        [again] = evaluate_encoder(encoders[dtype], [bench], [1, 10], settings, cache_dir=cache)
        assert len(spies[dtype].calls) == 2  # a cache hit: not encoded again
        assert again.metrics.aggregate == first[dtype].metrics.aggregate


def test_a_bf16_evaluation_is_a_different_baseline_identity():
    """A baseline evaluated in bf16 never stands in for an fp32 one (koe5-run reuses baselines by identity)."""
    bench = load_benchmark(SAMPLE)
    settings = EncodeSettings("query: ", "passage: ", 32, 64)
    ids = {d: identity(describe(load_encoder("builtin:tiny-ko-bert", dtype=d), "m", settings, [bench], [10]))
           for d in ("fp32", "bf16")}
    assert ids["fp32"] != ids["bf16"]


def test_an_unknown_dtype_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="fp32, bf16"):
        load_encoder("builtin:tiny-ko-bert", dtype="fp16")


def test_prefetching_tokenization_gives_identical_embeddings_and_runs_off_the_main_thread():
    """Encoder.encode tokenizes the next batch in a worker thread while the model runs: bit-identical
    embeddings to tokenizing in line, and the tokenizer really is called from the worker."""
    import threading

    texts = load_benchmark(SAMPLE).corpus_texts[:70]
    encoder = load_encoder("builtin:tiny-ko-bert")
    inline = encoder.encode(texts, "passage: ", 64, batch_size=16, prefetch=False)
    threads = []
    tokenizer = encoder.tokenizer
    call = type(tokenizer).__call__

    class Recording(type(tokenizer)):
        def __call__(self, *args, **kwargs):
            threads.append(threading.current_thread().name)
            return call(self, *args, **kwargs)

    tokenizer.__class__ = Recording
    try:
        prefetched = encoder.encode(texts, "passage: ", 64, batch_size=16)
    finally:
        tokenizer.__class__ = Recording.__mro__[1]
    assert np.array_equal(prefetched, inline)
    assert len(threads) == 5 and all(t.startswith("koe5-tokenize") for t in threads)


def test_the_cli_flag_and_the_spec_key_reach_the_encoder(capsys):
    """`koe5 eval --dtype bf16` records bf16 in the evaluation's settings; koe5-run's evaluation loads the
    encoder in the spec's eval.dtype."""
    import json

    from koe5 import cli
    from koe5.orchestrate.evaluation import _load
    from koe5.spec.schema import DataSpec, EvalSpec, ModelSpec, SourceSpec, Spec

    code = cli.main(["eval", "--model", "builtin:tiny-ko-bert", "--benchmark", SAMPLE, "--k", "1",
                     "--query-max-len", "32", "--passage-max-len", "32", "--dtype", "bf16", "--device", "cpu",
                     "--json", "--no-record", "--no-cache"])
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out)["settings"]["eval"]["dtype"] == "bf16"

    spec = Spec(name="m", model=ModelSpec(name_or_path="builtin:tiny-ko-bert"),
                data=DataSpec(sources=[SourceSpec(path="x")]), eval=EvalSpec(dtype="bf16"))
    encoder, _ = _load(spec, "builtin:tiny-ko-bert")
    assert encoder.dtype == "bf16" and next(encoder.model.parameters()).dtype == torch.bfloat16
