"""Sharded encoding: N processes give the same embeddings, in the same order, as one."""

import json

import numpy as np
import pytest

from koe5.eval.shard import encode_sharded, slice_bounds
from koe5.encoder import load_encoder

SAMPLE = "koe5/assets/ko_sample/train.jsonl"


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (7, 2), (10, 3), (100, 8)])
def test_slices_cover_every_text_once_in_order(n, world):
    bounds = [slice_bounds(n, world, r) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_two_processes_encode_exactly_like_one(dtype):
    """And in the evaluation's dtype (eval.dtype): the ranks load the model in it too."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    rows = [json.loads(line) for line in (root / SAMPLE).read_text(encoding="utf-8").splitlines()[:41]]
    texts = [r["document"] for r in rows]  # an odd count: the slices differ in size
    encoder = load_encoder("builtin:tiny-ko-bert", dtype=dtype)
    single = encoder.encode(texts, "passage: ", 128, batch_size=16)
    sharded = encode_sharded(encoder.path, texts, "passage: ", 128, nproc=2, batch_size=16, dtype=dtype)
    assert sharded.shape == single.shape
    # bf16 rows round differently when the batches around them change shape (5e-5 seen); a rank encoding
    # in fp32 instead would be off by ~1e-3 (checked below), outside this tolerance
    np.testing.assert_allclose(sharded, single, atol=1e-5 if dtype == "fp32" else 2e-4)
    if dtype == "bf16":
        fp32 = load_encoder("builtin:tiny-ko-bert").encode(texts, "passage: ", 128, batch_size=16)
        assert np.abs(fp32 - single).max() > 5e-4
