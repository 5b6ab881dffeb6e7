"""The GPU-session checkpoint packer must be lossless: the device's numbers are only the real model's if the
rebuilt weights are bit for bit the ones packed (benchmarks/device/pack_checkpoint.py)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("pack_checkpoint", ROOT / "benchmarks/device/pack_checkpoint.py")
pack_checkpoint = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pack_checkpoint)


def q4_tensor(rng, shape):
    """Random weights of the Q4_0 form: (nibble - 8) * float16 scale per block of 32, scales of both signs."""
    n = int(np.prod(shape))
    q = rng.integers(-8, 8, size=(n // 32, 32)).astype(np.float32)
    scale = (rng.standard_normal(n // 32) * 0.05).astype(np.float16).astype(np.float32)
    scale[::7] = 0  # all-zero blocks
    return (q * scale[:, None]).reshape(shape).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q4_round_trip_is_bit_exact(seed):
    rng = np.random.default_rng(seed)
    values = q4_tensor(rng, (64, 96))
    packed = pack_checkpoint.to_q4(values)
    assert packed is not None
    assert np.array_equal(pack_checkpoint.from_q4(*packed, values.shape), values)
    assert packed[0].nbytes + packed[1].nbytes < values.nbytes / 6


def test_values_not_of_q4_form_are_refused():
    rng = np.random.default_rng(3)
    assert pack_checkpoint.to_q4(rng.standard_normal((4, 32)).astype(np.float32)) is None
    assert pack_checkpoint.to_q4(np.ones(48, np.float32)) is None  # not whole blocks


def test_pack_unpack_keeps_used_rows_and_zeroes_the_rest(tmp_path):
    from safetensors.numpy import load_file, save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    rng = np.random.default_rng(4)
    vocab = {f"w{i}": i for i in range(40)} | {"[UNK]": 40}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[MASK]"])  # id 41: in no text, but a special token's row is kept
    model = tmp_path / "model"
    model.mkdir()
    tok.save(str(model / "tokenizer.json"))
    (model / "config.json").write_text("{}")
    state = {pack_checkpoint.WORD: q4_tensor(rng, (42, 64)), "layer.weight": q4_tensor(rng, (64, 64)),
             "layer.bias": rng.standard_normal(64).astype(np.float32)}
    save_file(state, str(model / "model.safetensors"))
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"query": "w9 w12", "docs": ["w30", {"title": "w31", "text": "w5"}]}) + "\n")

    pack_checkpoint.pack(model, tmp_path / "packed.npz", [texts])
    pack_checkpoint.unpack(tmp_path / "packed.npz", tmp_path / "packed-meta", tmp_path / "out",
                           model / "tokenizer.json")
    rebuilt = load_file(str(tmp_path / "out/model.safetensors"))
    used = [5, 9, 12, 30, 31, 40, 41]  # 40: "query:"/"passage:" prefixes are unknown words here
    for name, tensor in state.items():
        if name == pack_checkpoint.WORD:
            assert np.array_equal(rebuilt[name][used], tensor[used])
            others = np.setdiff1d(np.arange(42), used)
            assert not rebuilt[name][others].any()
        else:
            assert np.array_equal(rebuilt[name], tensor)
    assert (tmp_path / "out/config.json").exists()
