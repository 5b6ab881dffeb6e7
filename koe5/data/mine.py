"""Hard-negative mining: embed the training queries and a corpus with a model, search, and take for each
query passages that rank high but are not its positives (`koe5 mine`, in koe5/data/mine_commands.py).

A mined negative must (1) rank within `ranks` for its query, (2) not be a positive of any row with the
same query text nor the query itself (paraphrase sets hold queries among the passages), compared by
normalized text (`text_key`), and (3) score below a margin under the
query's best positive: passages scoring about as high as the positive are often unlabelled positives,
and training against them teaches the model to push true matches away.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from koe5.data.errors import DataError
from koe5.data.sources import iter_records
from koe5.data.triples import Triple, read_triples, text_key


@dataclass
class MineStats:
    rows_read: int = 0
    queries: int = 0
    corpus: int = 0
    rows_written: int = 0
    rows_short: int = 0           # fewer than the asked negatives (the rows with none included)
    rows_without_negatives: int = 0
    negatives_written: int = 0
    # Candidates examined within the rank range and refused (until each query had enough negatives):
    rejected_as_positive: int = 0    # a positive of a row with this query, or the query itself (normalized)
    rejected_above_margin: int = 0   # scored too close to the best positive: likely an unlabelled positive

    @property
    def mean_negatives(self) -> float:
        return self.negatives_written / self.rows_written if self.rows_written else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "mean_negatives": round(self.mean_negatives, 4)}


def read_rows(path: str | Path, fields: dict[str, str] | None = None) -> list[Triple]:
    """The training rows, in any format a training source may have (koe5/data/sources.py); their
    hard negatives, if any, are replaced by the mined ones."""
    return read_triples(path, hard_negatives=0, fields=fields)


def query_key(row: Triple) -> str:
    """Rows with the same query text (up to surrounding space) share their positives."""
    return row.query.strip()


def iter_passages(path: str | Path) -> Iterator[str]:
    """Extra corpus passages: a `.txt` file holds one per line; any other file is a source format whose
    records carry `text`."""
    if str(path).endswith(".txt"):
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{n}: not UTF-8 text") from None
                if line.strip():
                    yield line
        return
    for where, record in iter_records(path):
        if isinstance(record, DataError):
            raise record
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: field 'text' must be a non-empty string")
        yield text


def build_corpus(rows: list[Triple], extra: list[str | Path] = ()) -> list[str]:
    """Every positive, then the extra passages; exact duplicates once, first occurrence first."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row.positives))
    for path in extra:
        seen.update(dict.fromkeys(iter_passages(path)))
    return list(seen)


def unique_queries(rows: list[Triple]) -> list[str]:
    return list(dict.fromkeys(query_key(row) for row in rows))


def parse_ranks(text: str) -> tuple[int, int]:
    """'A-B' -> (A, B) with 1 <= A <= B; ValueError says what is wrong."""
    a, sep, b = text.partition("-")
    try:
        lo, hi = int(a), int(b)
    except ValueError:
        raise ValueError(f"expected A-B (1-based ranks, e.g. 10-100), got '{text}'") from None
    if not sep or lo < 1 or hi < lo:
        raise ValueError(f"expected A-B with 1 <= A <= B (e.g. 10-100), got '{text}'")
    return lo, hi


def mine(rows: list[Triple], passages: list[str], query_emb: np.ndarray, passage_emb: np.ndarray,
         ranks: tuple[int, int] = (10, 100), negatives: int = 8, margin: float = 0.95,
         margin_abs: Optional[float] = None) -> tuple[list[dict], MineStats]:
    """Output rows (query, document, hard_negative) and counts. `query_emb` is aligned with
    unique_queries(rows), `passage_emb` with `passages`, which must hold every positive (build_corpus).
    `margin_abs`, when given, replaces the relative `margin`."""
    from koe5.eval.search import search

    queries = unique_queries(rows)
    if len(queries) != len(query_emb) or len(passages) != len(passage_emb):
        raise ValueError("embeddings do not match the queries or passages they should encode")
    index = {p: i for i, p in enumerate(passages)}
    pos_ids: dict[str, set[int]] = {q: set() for q in queries}
    for row in rows:
        pos_ids[query_key(row)].update(index[p] for p in row.positives)
    keys = [text_key(p) for p in passages]

    lo, hi = ranks
    mined: dict[str, list[str]] = {}
    stats = MineStats(rows_read=len(rows), queries=len(queries), corpus=len(passages))
    for q, qv, (ids, scores) in zip(queries, query_emb, search(query_emb, passage_emb, hi)):
        # search() may return ties past the cut in any order; fix one ranking: score, then corpus order.
        order = np.lexsort((ids, -scores))[:hi]
        ids, scores = ids[order], scores[order]
        best = float(max(passage_emb[i] @ qv for i in pos_ids[q]))
        limit = best - margin_abs if margin_abs is not None else margin * best
        excluded = {keys[i] for i in pos_ids[q]} | {text_key(q)}
        found = []
        for i, s in zip(ids[lo - 1:], scores[lo - 1:]):
            if keys[i] in excluded:
                stats.rejected_as_positive += 1
            elif s >= limit:
                stats.rejected_above_margin += 1
            else:
                found.append(passages[i])
                if len(found) == negatives:
                    break
        mined[q] = found

    out = []
    for row in rows:
        negs = mined[query_key(row)]
        stats.rows_short += len(negs) < negatives
        if not negs:
            stats.rows_without_negatives += 1
            continue
        document = row.positives[0] if len(row.positives) == 1 else list(row.positives)
        out.append({"query": row.query, "document": document, "hard_negative": list(negs)})
        stats.negatives_written += len(negs)
    stats.rows_written = len(out)
    return out, stats


def mine_with_encoder(encoder, rows: list[Triple], passages: list[str], query_prefix: str, passage_prefix: str,
                      max_len: int = 256, batch_size: int = 64, progress: bool = True,
                      **options) -> tuple[list[dict], MineStats]:
    """Embed with `encoder` (koe5.encoder.Encoder), then mine(); `options` go to mine()."""
    q = encoder.encode(unique_queries(rows), query_prefix, max_len, batch_size,
                       progress="embed queries" if progress else False)
    p = encoder.encode(passages, passage_prefix, max_len, batch_size,
                       progress="embed corpus" if progress else False)
    return mine(rows, passages, q, p, **options)


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
