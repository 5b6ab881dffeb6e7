"""The token cache gives exactly the ids the tokenizer gives, is reused when nothing that decides the ids
changed, and the sampler's per-epoch choices (positive, hard negatives, single-source batches) are
deterministic and do what the spec says."""

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from koe5.data import tokens
from koe5.data.dataset import load_tokenizer, load_training_data
from koe5.data.triples import text_key
from koe5.inputs import tokenize
from koe5.spec import expand

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"
CPU = torch.device("cpu")


def random_text(rng: random.Random, max_words: int) -> str:
    words = []
    for _ in range(rng.randint(1, max_words)):
        if rng.random() < 0.8:
            words.append("".join(chr(rng.randint(0xAC00, 0xD7A3)) for _ in range(rng.randint(1, 4))))
        else:
            words.append(rng.choice(["GPU", "e5", "2024년", "ZeRO-3", "(주)", "A/B", "..."]))
    return " ".join(words)


def random_rows(seed: int, n: int, positives: int = 1, negatives: int = 2) -> list[dict]:
    rng = random.Random(seed)
    return [{"query": random_text(rng, 12),
             "document": [random_text(rng, 120) for _ in range(positives)],
             "hard_negative": [random_text(rng, 120) for _ in range(negatives)]} for _ in range(n)]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def spec_for(path: Path, *overrides: str):
    return expand(QUICKSTART, [f"data.sources[0].path={path}", "train.batch_size=8", "cache.chunk_size=8",
                               *overrides])[0].spec


def roberta_style_tokenizer(texts: list[str]):
    """A byte-level BPE with <s> ... </s> around each text (XLM-R's layout), trained here on the test's texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("kind", ["demo-bert", "roberta-style"])
def test_cached_ids_equal_the_tokenizer_on_random_text(tmp_path, kind):
    rows = random_rows(seed=hash(kind) % 1000, n=48, positives=2, negatives=3)
    path = write(tmp_path / "train.jsonl", rows)
    spec = spec_for(path, "model.query_max_len=12", "model.passage_max_len=37", "data.hard_negatives=2",
                    "data.positive=sample")
    if kind == "demo-bert":
        tokenizer = load_tokenizer(spec)
    else:
        tokenizer = roberta_style_tokenizer([r["query"] for r in rows] + [d for r in rows for d in r["document"]])
    data = load_training_data(spec, tokenizer)
    m = spec.model
    for step in (0, 5, 13):  # several epochs: other positives and negatives are drawn
        batch = data.global_batch(step)
        start = np.asarray(data.sources[0].rows_docs)[batch.row]
        texts = [rows[r]["document"] + rows[r]["hard_negative"] for r in batch.row]
        queries, documents, keys, n_tokens = data.collate(batch, CPU)
        want_q = tokenize(tokenizer, [rows[r]["query"] for r in batch.row], m.query_prefix, m.query_max_len)
        doc_texts = [texts[i][p - start[i]] for i, p in enumerate(batch.positive)]
        doc_texts += [texts[i][j - start[i]] for i in range(len(batch)) for j in batch.negatives[i]]
        want_d = tokenize(tokenizer, doc_texts, m.passage_prefix, m.passage_max_len)
        for got, want in ((queries, want_q), (documents, want_d)):  # the training path = the evaluation path
            assert got.keys() == want.keys()
            for k in got:
                assert torch.equal(got[k], want[k]), k
        # and both equal the tokenizer's own truncation, row by row
        q_texts = [rows[r]["query"] for r in batch.row]
        for got, texts_, prefix, max_len in ((queries, q_texts, m.query_prefix, m.query_max_len),
                                             (documents, doc_texts, m.passage_prefix, m.passage_max_len)):
            reference = tokenizer([prefix + t for t in texts_], truncation=True, max_length=max_len)["input_ids"]
            width = got["input_ids"].shape[1]
            assert width % 8 == 0 or width == max_len
            for ids, mask, ref in zip(got["input_ids"], got["attention_mask"], reference):
                assert ids[:int(mask.sum())].tolist() == ref and (ids[int(mask.sum()):] == tokenizer.pad_token_id).all()
        assert n_tokens == int(want_q["attention_mask"].sum() + want_d["attention_mask"].sum())
        assert keys.tolist() == [text_key(t) for t in doc_texts]
    # documents really were truncated, and their untruncated lengths are kept for `koe5 data stats`
    assert int(np.max(data.sources[0].docs_len)) > m.passage_max_len


def test_a_second_load_reuses_the_cache_and_a_changed_setting_or_source_rebuilds_it(tmp_path, monkeypatch):
    path = write(tmp_path / "train.jsonl", random_rows(seed=1, n=20))
    first = load_training_data(spec_for(path)).sources[0].directory
    built = []
    real_build = tokens._build
    monkeypatch.setattr(tokens, "_build", lambda *a: (built.append(a[3]), real_build(*a))[1])
    assert load_training_data(spec_for(path)).sources[0].directory == first and built == []
    assert load_training_data(spec_for(path, "model.passage_max_len=32")).sources[0].directory != first
    assert load_training_data(spec_for(path, "model.query_prefix=질문: ")).sources[0].directory != first
    write(path, random_rows(seed=2, n=20))  # same file, new content
    assert load_training_data(spec_for(path)).sources[0].directory != first
    assert len(built) == 3
    assert not list(first.parent.glob("*.partial-*"))  # builds happen under a temporary name


def test_a_failed_build_leaves_no_cache_behind(tmp_path):
    path = write(tmp_path / "train.jsonl", random_rows(seed=1, n=20))
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"query": "q"}\n')
    with pytest.raises(ValueError, match=":21: missing field 'document'"):
        load_training_data(spec_for(path))
    root = Path(tokens.cache_root()) / "tokens"
    assert not [p for p in root.iterdir() if p.is_dir() and not (p / "meta.json").exists()]


def test_positive_sampling_is_deterministic_per_epoch_and_reaches_every_positive(tmp_path):
    path = write(tmp_path / "train.jsonl", random_rows(seed=3, n=16, positives=3, negatives=5))
    sample = load_training_data(spec_for(path, "data.positive=sample", "data.hard_negatives=2"))
    again = load_training_data(spec_for(path, "data.positive=sample", "data.hard_negatives=2"))
    first = load_training_data(spec_for(path, "data.hard_negatives=2"))
    n = sample.steps_per_epoch  # 2 batches of 8: every row once per epoch
    picks: dict[int, list[int]] = {}
    for step in range(20 * n):
        b, b2, f = sample.global_batch(step), again.global_batch(step), first.global_batch(step)
        assert b.ids() == b2.ids() and b.positive.tolist() == b2.positive.tolist()
        start = np.asarray(sample.sources[0].rows_docs)[b.row]
        assert (f.positive == np.asarray(first.sources[0].rows_docs)[f.row]).all()  # `first`: always the first
        for row, p in zip(b.row.tolist(), (b.positive - start).tolist()):
            picks.setdefault(row, []).append(p)
        # negatives rotate: epoch e takes negatives 2e and 2e+1 (mod 5), after the 3 positives
        epoch = step // n
        assert ((b.negatives - start[:, None] - 3) == np.array([(2 * epoch) % 5, (2 * epoch + 1) % 5])).all()
    assert all(len(v) == 20 for v in picks.values())
    assert all(set(v) == {0, 1, 2} for v in picks.values())  # 20 epochs reach all three positives of every row
    counts = Counter(p for v in picks.values() for p in v)
    assert min(counts.values()) > 0.2 * sum(counts.values())  # and roughly evenly (expected 1/3 each)


def test_one_source_per_batch_draws_every_batch_from_a_single_source_in_the_mix(tmp_path):
    a = write(tmp_path / "a.jsonl", random_rows(seed=4, n=40))
    b = write(tmp_path / "b.jsonl", random_rows(seed=5, n=24))
    spec = expand(QUICKSTART, [f"data.sources[0].path={a}", "data.sources[0].name=a", "data.sources[0].weight=3",
                               f"data.sources[1].path={b}", "data.sources[1].name=b", "data.mixing=weighted",
                               "data.one_source_per_batch=true", "train.batch_size=8", "cache.chunk_size=4",
                               "train.max_steps=400"])[0].spec
    data = load_training_data(spec)
    assert data.steps_per_epoch == 40 // 8 + 24 // 8
    per_source = Counter()
    rows_seen: dict[int, list[int]] = {0: [], 1: []}
    for step in range(400):
        batch = data.global_batch(step)
        sources = set(batch.source.tolist())
        assert len(sources) == 1  # both ranks' halves come from the same source too
        k = sources.pop()
        per_source[k] += 1
        rows_seen[k] += batch.row.tolist()
    assert abs(per_source[0] / per_source[1] - 3) < 0.6  # 400 draws at p = 3/4 : 1/4
    # each source is read in shuffled passes: every row once per pass (whole passes only)
    for k, size in ((0, 40), (1, 24)):
        seen = rows_seen[k][:(len(rows_seen[k]) // size) * size]
        for p in range(0, len(seen), size):
            assert sorted(seen[p:p + size]) == list(range(size))
    small = expand(QUICKSTART, [f"data.sources[0].path={a}", f"data.sources[1].path={b}", "data.sources[1].name=b",
                                "data.one_source_per_batch=true", "train.batch_size=32", "cache.chunk_size=4"])[0].spec
    with pytest.raises(ValueError, match=r"smaller than train.batch_size=32 .*: b \(24\)"):
        load_training_data(small)


def test_tokens_per_example_counts_query_positive_and_negatives(tmp_path):
    path = write(tmp_path / "train.jsonl", random_rows(seed=6, n=16, negatives=2))
    data = load_training_data(spec_for(path, "data.hard_negatives=2"))
    batch = data.global_batch(0)
    _, _, _, n_tokens = data.collate(batch, CPU)
    assert int(data.tokens_per_example(batch).sum()) == n_tokens
