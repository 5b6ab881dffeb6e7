"""Negatives mined from the spec (`data.sources[i].mine`) while the token cache is built: checked against an
independent brute-force ranking of the same embeddings; a row keeps its own negatives first; the counts
of what was kept and rejected reach the cache's notes; the cache is rebuilt when a mining setting changes;
bad settings name their key path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from koe5.data.dataset import load_training_data
from koe5.data.triples import text_key
from koe5.demo_model import SAMPLE_TRAIN
from koe5.spec import SpecError, expand

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"
RANKS = (2, 40)
MARGIN = 0.998  # the untrained demo model scores nearly everything 0.88-0.94: tight margins bind


def write_rows(path: Path, n: int, own_negatives: bool) -> list[dict]:
    """Sample query/positive rows, with their own hard negative or without one, and one query asked twice
    with another positive (every positive of a query must be excluded for both of its rows)."""
    base = [json.loads(line) for line in SAMPLE_TRAIN.read_text(encoding="utf-8").splitlines()[:n]]
    rows = [{"query": r["query"], "document": r["document"]} | ({"hard_negative": r["hard_negative"]}
                                                                 if own_negatives else {}) for r in base]
    rows.append(dict(rows[0], document=base[1]["document"]))
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


def source(path: Path, name: str, own_negatives: bool, first: str) -> str:
    negatives = '"hard_negative"' if own_negatives else "null"
    return (f'{{"path": "{path}", "name": "{name}", "fields": {{"hard_negative": {negatives}}}, '
            f'"mine": {{"negatives": 3, "ranks": [{RANKS[0]}, {RANKS[1]}], "margin": {MARGIN}, "first": "{first}"}}}}')


def spec_for(tmp: Path, *overrides: str, n: int = 120, first: str = "own"):
    """Two mined sources: pairs without negatives (MS MARCO-ko-like) and triples with their own."""
    pairs, triples = tmp / "pairs.jsonl", tmp / "triples.jsonl"
    if not pairs.exists():
        write_rows(pairs, n, own_negatives=False)
        write_rows(triples, n // 3, own_negatives=True)
    sources = f"{source(pairs, 'pairs', False, first)}, {source(triples, 'triples', True, first)}"
    return expand(QUICKSTART, [f"data.sources=[{sources}]", "data.hard_negatives=1", *overrides])[0].spec


def reference(rows: list[dict]) -> dict[str, list[str]]:
    """Per query: the first 3 passages of the source's pool (positives and own negatives) ranked
    RANKS[0]..RANKS[1] by the demo model (ties by pool order) that are no positive of the query, not the
    query, and score below MARGIN x its best positive."""
    from koe5.encoder import load_encoder

    encoder = load_encoder("builtin:tiny-ko-bert")
    pool = list(dict.fromkeys(p for r in rows for p in [r["document"]] + ([r["hard_negative"]] if "hard_negative" in r else [])))
    queries = list(dict.fromkeys(r["query"].strip() for r in rows))
    q = encoder.encode(queries, "query: ", 32)
    p = encoder.encode(pool, "passage: ", 128)
    positives = {qq: {text_key(r["document"]) for r in rows if r["query"].strip() == qq} for qq in queries}
    out = {}
    for qi, qq in enumerate(queries):
        scores = (p @ q[qi]).astype(np.float32)
        order = sorted(range(len(pool)), key=lambda i: (-scores[i], i))[:RANKS[1]]
        best = max(float(scores[i]) for i in range(len(pool)) if text_key(pool[i]) in positives[qq])
        found = [pool[i] for i in order[RANKS[0] - 1:]
                 if text_key(pool[i]) not in positives[qq] | {text_key(qq)} and scores[i] < MARGIN * best]
        out[qq] = found[:3]
    return out


def negatives_of(data, k: int = 0) -> dict[str, list[list[int]]]:
    """Per query text: the token ids of each row's hard negatives, in order."""
    t = data.sources[k]
    out = {}
    for row in range(t.n_rows):
        start, end = int(t.rows_docs[row] + t.rows_npos[row]), int(t.rows_docs[row + 1])
        out.setdefault(tuple(t.query(row).tolist()), []).append([t.doc(j).tolist() for j in range(start, end)])
    return out


@pytest.mark.parametrize("first", ["own", "mined"])
def test_mined_negatives_match_a_brute_force_ranking_in_the_declared_order(tmp_path, first):
    """Catches mining over the wrong pool (another source's passages, or only positives), a negative that
    is a positive of the query's other row or the query itself, a margin not applied, and the row's own and
    mined negatives in the wrong order (own first by default; mined first, then the own ones mining did not
    pick, with mine.first: mined), or one kind dropped."""
    from transformers import AutoTokenizer

    from koe5.model import resolve_model_path

    spec = spec_for(tmp_path, first=first)
    data = load_training_data(spec)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-ko-bert"))

    def ids(text: str, prefix: str, max_len: int) -> list[int]:
        return tok(prefix + text, truncation=True, max_length=max_len)["input_ids"]

    for k, name in enumerate(("pairs", "triples")):
        rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
        expected = reference(rows)
        assert sum(1 for v in expected.values() if v) > len(expected) // 2, "the margin left too little to check"
        got = negatives_of(data, k)
        for r in rows:
            own = [r["hard_negative"]] if "hard_negative" in r else []
            mined = expected[r["query"].strip()]
            want = (own + [n for n in mined if n not in own] if first == "own"
                    else mined + [n for n in own if n not in mined])
            assert [ids(n, "passage: ", 128) for n in want] in got[tuple(ids(r["query"], "query: ", 32))], r["query"]
        notes = data.sources[k].meta["left_out"]
        assert notes["mine: rows given mined negatives"] == sum(1 for r in rows if expected[r["query"].strip()])
        assert notes["mine: candidates rejected above the margin (likely false negatives)"] > 0
        assert notes["mine: candidates rejected as a positive or the query itself (normalized text)"] > 0


def test_mining_counts_reach_data_stats_and_the_runs_data_checks(tmp_path):
    from koe5.data.commands import data_stats
    from koe5.orchestrate.checks import check_data

    spec = spec_for(tmp_path, n=30)
    for left_out in (data_stats(spec)["sources"]["pairs"]["left_out"], check_data(spec)["left_out"]["pairs"]):
        assert left_out["mine: rows given mined negatives"] > 0


def test_changing_a_mining_setting_rebuilds_the_cache(tmp_path):
    a = load_training_data(spec_for(tmp_path, n=30)).sources[0].directory
    b = load_training_data(spec_for(tmp_path, "data.sources[0].mine.margin=0.99", n=30)).sources[0].directory
    assert a != b


@pytest.mark.parametrize("override, key", [
    ("data.sources[0].mine.ranks=[5, 2]", "data.sources[0].mine.ranks"),
    ("data.sources[0].mine.margin=1.5", "data.sources[0].mine.margin"),
    ("data.sources[0].mine.negatives=-1", "data.sources[0].mine.negatives"),
])
def test_bad_mining_settings_name_their_key(tmp_path, override, key):
    with pytest.raises(SpecError) as e:
        spec_for(tmp_path, override, n=10)
    assert key in str(e.value)
