"""The builtin demonstration model's tokenizer reads what the quickstart feeds it."""

from __future__ import annotations

from transformers import AutoTokenizer

from koe5.demo_model import build_demo_model


def test_prefixes_and_ascii_are_known_pieces(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(build_demo_model(tmp_path))
    for text in ("query: 서울의 인구는?", "passage: 서울은 대한민국의 수도이다.", "passage: Seoul, 2020 (9.4M)!"):
        pieces = tokenizer.tokenize(text)
        assert tokenizer.unk_token not in pieces, (text, pieces)
    assert tokenizer.tokenize("query: 질문")[:2] == ["query", ":"]
    assert tokenizer.tokenize("passage: 문서")[:2] == ["passage", ":"]
