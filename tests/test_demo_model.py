"""The builtin demonstration model's tokenizer reads what the quickstart feeds it."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoTokenizer

from koe5.demo_model import build_demo_model


def test_prefixes_and_ascii_are_known_pieces(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(build_demo_model(tmp_path))
    for text in ("query: 서울의 인구는?", "passage: 서울은 대한민국의 수도이다.", "passage: Seoul, 2020 (9.4M)!"):
        pieces = tokenizer.tokenize(text)
        assert tokenizer.unk_token not in pieces, (text, pieces)
    assert tokenizer.tokenize("query: 질문")[:2] == ["query", ":"]
    assert tokenizer.tokenize("passage: 문서")[:2] == ["passage", ":"]


def test_two_processes_build_the_same_model(tmp_path):
    """Catches a vocabulary that depends on the process (the `tokenizers` WordPiece trainer breaks ties
    differently on each run): CI and this machine would then train and score different models."""
    import subprocess
    import sys

    builds = []
    for seed in ("0", "1"):
        code = "import sys; from koe5.demo_model import build_demo_model; print(build_demo_model())"
        env = dict(os.environ, KOE5_CACHE=str(tmp_path / seed), PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        builds.append(Path(out.stdout.strip().splitlines()[-1]))
    for name in ("tokenizer.json", "model.safetensors"):
        assert (builds[0] / name).read_bytes() == (builds[1] / name).read_bytes(), name
