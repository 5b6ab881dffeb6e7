"""Ship the mE5-small checkpoint to a lent GPU machine, whose upload limit (64 MiB) is far below its 470 MB.

    python benchmarks/device/pack_checkpoint.py pack /work/me5-small .device/me5-small.npz TEXT_FILE...
    python benchmarks/device/pack_checkpoint.py unpack .device/me5-small.npz .device/me5-small-meta OUT_DIR

The checkpoint built by ../shared/tools/me5_small is 4-bit (Q4_0) weights dequantized to float32: every
block of 32 values is q * d with q an integer in [-8, 7] and d one float16 scale. `pack` finds q and d
again (and keeps float32 for any tensor that is not of that form), which is lossless: `unpack` rebuilds
float32 tensors bit for bit, and `pack` checks that before writing.

The 250k-row word-embedding matrix is cut to the rows that the tokenizer produces for the given text
files (the training triples and the benchmarks); the other rows are rebuilt as zeros. A model only ever
reads the rows of the tokens in its input, so on those texts the rebuilt checkpoint computes exactly what
the full one does, in training and evaluation alike. It is not a general-purpose checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

BLOCK = 32
WORD = "embeddings.word_embeddings.weight"


def to_q4(values: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(packed nibbles uint8 [n/2], float16 scales [n/32]) with values == (nibble - 8) * scale exactly, or None."""
    if values.size % BLOCK:
        return None
    blocks = values.reshape(-1, BLOCK).astype(np.float32)
    top = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(1)]
    scale = np.zeros(len(blocks), np.float32)
    found = top == 0  # an all-zero block: scale 0
    for q_top in (-8, 7, -7, 6, -6, 5, -5, 4, -4, 3, -3, 2, -2, 1, -1):  # the quantizer maps the top value to -8
        todo = ~found
        if not todo.any():
            break
        d = (top[todo] / q_top).astype(np.float16).astype(np.float32)
        q = np.rint(blocks[todo] / d[:, None])
        ok = (q >= -8).all(1) & (q <= 7).all(1) & ((q * d[:, None]).astype(np.float32) == blocks[todo]).all(1)
        idx = np.flatnonzero(todo)[ok]
        scale[idx] = d[ok]
        found[idx] = True
    if not found.all():
        return None
    q = np.zeros_like(blocks, dtype=np.int8)
    nz = scale != 0
    q[nz] = np.rint(blocks[nz] / scale[nz, None]).astype(np.int8)
    nibbles = (q + 8).astype(np.uint8).reshape(-1)
    return nibbles[0::2] | (nibbles[1::2] << 4), scale.astype(np.float16)


def from_q4(packed: np.ndarray, scale: np.ndarray, shape) -> np.ndarray:
    nibbles = np.empty(packed.size * 2, np.int8)
    nibbles[0::2], nibbles[1::2] = packed & 0x0F, packed >> 4
    q = (nibbles - 8).astype(np.float32).reshape(-1, BLOCK)
    return (q * scale.astype(np.float32)[:, None]).reshape(shape)


def used_token_ids(model_dir: Path, text_files: list[Path]) -> np.ndarray:
    """Every id the tokenizer gives any string in the files (JSON values, with and without E5 prefixes),
    and its special tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    strings: set[str] = set()

    def collect(v):
        if isinstance(v, str):
            strings.add(v)
        elif isinstance(v, list):
            for x in v:
                collect(x)
        elif isinstance(v, dict):
            for x in v.values():
                collect(x)
            if isinstance(v.get("title"), str) and isinstance(v.get("text"), str):
                strings.add(f"{v['title']} {v['text']}")
                strings.add(f"{v['title']}\n{v['text']}")

    for path in text_files:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                collect(json.loads(line))
    texts = [p + s for s in strings for p in ("", "query: ", "passage: ")]
    ids: set[int] = set(tok.get_added_tokens_decoder())  # the special tokens: padding, <s>, </s>, <unk>, ...
    for enc in tok.encode_batch(texts):
        ids.update(enc.ids)
    return np.array(sorted(ids), np.int64)


def pack(model_dir: Path, out: Path, text_files: list[Path]) -> None:
    from safetensors.numpy import load_file

    state = load_file(str(model_dir / "model.safetensors"))
    keep = used_token_ids(model_dir, text_files)
    arrays: dict[str, np.ndarray] = {"__keep__": keep}
    meta = {}
    for name, tensor in state.items():
        part = tensor[keep] if name == WORD else tensor
        q4 = to_q4(part)
        if q4 is None:
            arrays[f"{name}|f32"] = part
        else:
            arrays[f"{name}|q"], arrays[f"{name}|d"] = q4
            assert np.array_equal(from_q4(*q4, part.shape), part), name  # lossless, or no pack at all
        meta[name] = list(tensor.shape)
    np.savez(out, **arrays)
    meta_dir = out.with_suffix("").with_name(out.stem + "-meta")
    meta_dir.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "tokenizer.json"):
            shutil.copy(f, meta_dir / f.name)
        elif f.is_dir():
            shutil.copytree(f, meta_dir / f.name, dirs_exist_ok=True)
    (meta_dir / "shapes.json").write_text(json.dumps(meta))
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB; kept {len(keep):,} of {state[WORD].shape[0]:,} "
          f"word-embedding rows")


def unpack(packed: Path, meta_dir: Path, out: Path, tokenizer: Path) -> None:
    from safetensors.numpy import save_file

    arrays = np.load(packed)
    shapes = json.loads((meta_dir / "shapes.json").read_text())
    keep = arrays["__keep__"]
    state = {}
    for name, shape in shapes.items():
        row_shape = [len(keep), *shape[1:]] if name == WORD else shape
        if f"{name}|f32" in arrays:
            part = arrays[f"{name}|f32"]
        else:
            part = from_q4(arrays[f"{name}|q"], arrays[f"{name}|d"], row_shape)
        if name == WORD:
            full = np.zeros(shape, np.float32)
            full[keep] = part
            part = full
        state[name] = np.ascontiguousarray(part, dtype=np.float32)
    out.mkdir(parents=True, exist_ok=True)
    for f in meta_dir.iterdir():
        if f.name != "shapes.json":
            (shutil.copytree(f, out / f.name, dirs_exist_ok=True) if f.is_dir() else shutil.copy(f, out / f.name))
    shutil.copy(tokenizer, out / "tokenizer.json")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    print(f"{out}: rebuilt ({len(state)} tensors)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("model_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("texts", type=Path, nargs="+")
    u = sub.add_parser("unpack")
    u.add_argument("packed", type=Path)
    u.add_argument("meta_dir", type=Path)
    u.add_argument("out", type=Path)
    u.add_argument("--tokenizer", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        pack(args.model_dir, args.out, args.texts)
    else:
        unpack(args.packed, args.meta_dir, args.out, args.tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
