"""Hard negatives mined for a training source as the spec declares them (`data.sources[i].mine`), while its
token cache is built (koe5/data/tokens.py), so pair and QA sets that publish no negatives (MS MARCO-ko,
KorSTS, paraphrases, question pairs) train against real near-misses instead of random rows.

    - {path: .../msmarco_kor.json, fields: {...}, mine: {negatives: 3, ranks: [3, 50], margin: 0.95}}

The pool is the source's own passages (every positive and hard negative of the rows this source reads,
the holdout's training side only), embedded by the mining model (`mine.model`, default the model being
trained, i.e. the base) at the training lengths. Mining itself is koe5/data/mine.py's `mine()`, the one
`koe5 mine` runs: a candidate must rank within `ranks`, must not be a positive of any row with the same
query nor the query itself (normalized text), and must score below the margin under the query's best
positive, since passages that score about as high as the positive are often unlabelled positives (false
negatives). A row keeps its own negatives first (NLI contradictions, pair-set negatives), then the mined
ones; with `mine.first: mined` the mined ones come first, then the row's own that mining did not pick
(data.hard_negatives trains on the first N, so this chooses which kind a short budget sees: a KorQuAD
question's nearest paragraphs instead of its article's next one). A row left with none still trains: the
batch sampler gives it other rows' positives. The teacher has no score for a mined negative
(fields.scores): it gets NaN, which leaves it out of the distillation term.

What mining kept and rejected is counted in the cache's meta.json (`left_out` notes, shown by
`koe5 data stats` and recorded with the run's data checks).
"""

from __future__ import annotations

from dataclasses import asdict, replace

from koe5.data.formats import Triple


def mining_model(source, trained_model: str) -> str:
    """`mine.model`, else the model being trained (model.name_or_path), as it is before training."""
    return source.mine.model or trained_model


def mining_identity(source, trained_model: str) -> dict:
    """What the mined negatives depend on besides the source's content: the settings and the mining
    model's weights (a content hash, so a retrained model at the same path mines anew)."""
    from koe5.fingerprint import weights_fingerprint
    from koe5.model import resolve_model_path

    path = resolve_model_path(mining_model(source, trained_model))
    return {**asdict(source.mine), "weights": weights_fingerprint(path)}


def mine_source(source, spec, triples: list[Triple], notes: dict, encoder=None) -> list[Triple]:
    """`triples` with mined hard negatives appended to each row's own; counts by reason go to `notes`."""
    from koe5.data.mine import mine

    m = source.mine
    pool = list(dict.fromkeys(p for t in triples for p in (*t.positives, *t.hard_negatives)))
    if encoder is None:
        encoder = _load_encoder(mining_model(source, spec.model.name_or_path), spec)
    queries = list(dict.fromkeys(t.query.strip() for t in triples))
    name = source.name or source.path
    q_emb = encoder.encode(queries, spec.model.query_prefix, spec.model.query_max_len, m.batch_size,
                           progress=f"mine {name}: queries")
    p_emb = encoder.encode(pool, spec.model.passage_prefix, spec.model.passage_max_len, m.batch_size,
                           progress=f"mine {name}: passages")
    rows, stats = mine(triples, pool, q_emb, p_emb, ranks=(m.ranks[0], m.ranks[1]), negatives=m.negatives,
                       margin=m.margin, margin_abs=m.margin_abs)
    mined = {row["query"]: row["hard_negative"] for row in rows}  # per query text, as mine() groups them
    out = []
    for t in triples:
        picked = tuple(mined.get(t.query, ()))
        if m.first == "mined":
            negatives = picked + tuple(n for n in t.hard_negatives if n not in picked)
        else:
            negatives = t.hard_negatives + tuple(n for n in picked if n not in t.hard_negatives)
        scores = None
        if t.scores is not None:  # the teacher scored the row's own documents; a mined one gets NaN
            own = dict(zip(t.hard_negatives, t.scores[len(t.positives):]))
            scores = t.scores[:len(t.positives)] + tuple(own.get(n, float("nan")) for n in negatives)
        out.append(replace(t, hard_negatives=negatives, scores=scores))
    counts = {
        "mine: rows given mined negatives": stats.rows_written,
        "mine: rows with fewer mined negatives than asked": stats.rows_short,
        "mine: rows with no mined negative (kept; the sampler gives them other rows' positives)":
            stats.rows_without_negatives,
        "mine: candidates rejected as a positive or the query itself (normalized text)": stats.rejected_as_positive,
        "mine: candidates rejected above the margin (likely false negatives)": stats.rejected_above_margin,
    }
    for reason, n in counts.items():
        notes[reason] = notes.get(reason, 0) + n
    return out


def _load_encoder(model: str, spec):
    import torch

    from koe5.encoder import load_encoder

    device = "cuda" if torch.cuda.is_available() and spec.train.device != "cpu" else "cpu"
    return load_encoder(model, pooling=spec.model.pooling, normalize=spec.model.normalize, device=device)
