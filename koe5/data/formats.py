"""Turn a source's records into training triples, one reader per published layout (the source's `format:`).

Where records come from (files, encodings, headerless columns) is koe5/data/sources.py's job; what to do
with a bad record (raise, or skip and count) and which holdout side to keep is koe5/data/triples.py's.
Every reader here yields `Triple`s, and a `DataError` (naming file:line or the JSON path) for a record that
does not fit its format instead of raising it, so `data.on_error: skip` can count it and go on.

    triples       one record per query: query, document (a string or a list of positives), hard_negative
                  (a string or a list; `fields.hard_negative: null` = no such column, as in MS MARCO-ko),
                  and optionally `fields.scores`: a teacher's score for each of those documents (score
                  distillation, loss.distill_weight), each positive then each hard negative, in order
    squad         SQuAD-style JSON (KorQuAD, KLUE-MRC): question -> its paragraph; the article's other
                  paragraphs are the hard negatives, starting with the next one, so data.hard_negatives
                  rotates through the article; unanswerable questions (`is_impossible`) are left out
    nli           rows grouped by premise: entailment hypotheses are the positives, contradiction hypotheses
                  the negatives (SimCSE-style); a premise without an entailment gives no triple
    scored_pairs  sentence pairs with a score (STS): a pair scoring >= min_score is a positive
    paraphrase    groups of paraphrases (`group_size` consecutive records, or a `fields.group` column): each
                  member is a query whose positives are the other members
    pairs         labelled sentence pairs (question pairs), grouped by query: `labels.positive` rows give
                  the positives, `labels.negative` rows (if declared) the hard negatives

Each triple carries a `unit`, what the holdout split assigns to a side as a whole: the article title
(squad), the premise (nli), the group (paraphrase), else the `fields.id` column if declared, else the query.
Rows a format leaves out by design (a neutral label, a low score, a premise without an entailment) are
not errors; they are counted in `notes` by reason.

The grouping formats (nli, pairs, paraphrase with a group column) hold one source's text in memory, since
a group's rows may be anywhere in the file.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from koe5.data.errors import DataError
from koe5.data.sources import iter_records, read_text

FORMATS = ("triples", "squad", "nli", "scored_pairs", "paraphrase", "pairs")
# Formats whose rows are (query, passage): the only ones a retrieval benchmark can be built from.
RETRIEVAL_FORMATS = ("triples", "squad")
# The label classes of each labelled format; the first one is the positive class, the second the negative.
LABEL_CLASSES = {"nli": ("entailment", "contradiction", "neutral"), "pairs": ("positive", "negative")}
DEFAULT_LABELS = {"nli": {c: [c] for c in LABEL_CLASSES["nli"]}}


@dataclass(frozen=True)
class Triple:
    query: str
    positives: tuple[str, ...]        # one or more; data.positive picks which one a step uses
    hard_negatives: tuple[str, ...]   # zero or more; the batch sampler rotates through them
    unit: str = field(default="", compare=False)  # what the holdout split assigns to a side (see above)
    # The teacher's score of each positive, then each hard negative (fields.scores); NaN where a document has
    # none (a mined negative); None: the source has no teacher scores.
    scores: tuple[float, ...] | None = None

    @property
    def document(self) -> str:
        return self.positives[0]


def read_format(source, read_negatives: bool, notes: Counter) -> Iterator["Triple | DataError"]:
    """The triples (and bad records, as DataError) of one source in its format. `source` is a SourceSpec;
    without `read_negatives` (data.hard_negatives: 0) no negatives are read or kept."""
    return READERS[source.format](source, read_negatives, notes)


def _records(source) -> Iterator[tuple[str, "dict | DataError"]]:
    return iter_records(source.path, source.split, encoding=source.encoding, file_type=source.file_type,
                        columns=source.columns)


# ---------------------------------------------------------------- fields of one record

def _label(name: str, column: str) -> str:
    return f"'{column}'" if column == name else f"'{column}' ({name})"


def text_field(record: dict, name: str, column: str, where: str) -> str:
    """One non-empty string cell."""
    return list_field(record, name, column, where, allow_list=False)[0]


def list_field(record: dict, name: str, column: str, where: str, allow_list: bool = True,
               allow_empty: bool = False) -> tuple[str, ...]:
    """A string, or a list of strings; each must be non-empty."""
    label = _label(name, column)
    if record.get(column) is None:
        raise DataError(f"{where}: missing field {label} (map other column names with the source's fields:)")
    value = record[column]
    values = list(value) if (allow_list and isinstance(value, (list, tuple))) else [value]
    if not values and not allow_empty:
        raise DataError(f"{where}: field {label} is an empty list")
    for v in values:
        if not isinstance(v, str):
            raise DataError(f"{where}: field {label} must be a string{' or a list of strings' if allow_list else ''}, "
                            f"found {type(v).__name__}")
        if not v.strip():
            raise DataError(f"{where}: field {label} is empty")
    return tuple(values)


def _unit(record: dict, fields, where: str, default: str) -> str:
    if not fields.id:
        return default
    if record.get(fields.id) is None:
        raise DataError(f"{where}: missing field {_label('id', fields.id)}")
    return str(record[fields.id])


def _distinct(texts, leave_out: str | None = None) -> tuple[str, ...]:
    """Each text once, in order, without `leave_out` (a query is never its own positive or negative)."""
    return tuple(t for t in dict.fromkeys(texts) if t != leave_out)


# ---------------------------------------------------------------- triples

def parse_record(record: dict, where: str, fields, read_negatives: bool) -> Triple:
    """One triple from one record; `fields` (a FieldsSpec) maps canonical names to the record's columns."""
    query = text_field(record, "query", fields.query, where)
    positives = list_field(record, "document", fields.document, where)
    negatives: tuple[str, ...] = ()
    scores = None
    if (read_negatives or fields.scores) and fields.hard_negative:
        # Fewer negatives than data.hard_negatives (even none) is fine: the batch sampler fills the rest.
        negatives = list_field(record, "hard_negative", fields.hard_negative, where, allow_empty=True)
    if fields.scores:  # read whole, so the count is checked against the record as written
        scores = score_list(record, fields.scores, len(positives) + len(negatives), where)
    if not read_negatives:
        negatives = ()
        scores = None if scores is None else scores[:len(positives)]
    return Triple(query, positives, negatives, _unit(record, fields, where, query), scores)


def score_list(record: dict, column: str, count: int, where: str) -> tuple[float, ...]:
    """The teacher's scores: `count` finite numbers, as a list or (CSV/TSV, where every cell is text) a cell
    of numbers separated by commas or spaces, optionally in brackets: `[0.9, 0.2]`."""
    label = _label("scores", column)
    raw = record.get(column)
    if raw is None:
        raise DataError(f"{where}: missing field {label} (the teacher's scores; map the column with fields.scores)")
    values = raw.strip().strip("[]").replace(",", " ").split() if isinstance(raw, str) else raw
    if not isinstance(values, (list, tuple)):
        values = [values]
    out = []
    for v in values:
        try:
            number = math.nan if isinstance(v, bool) else float(v)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise DataError(f"{where}: field {label} holds {v!r}, not a finite number")
        out.append(number)
    if len(out) != count:
        raise DataError(f"{where}: field {label} has {len(out)} scores for the record's {count} documents (one per "
                        "positive, then one per hard negative, in order)")
    return tuple(out)


def _triples(source, read_negatives: bool, notes: Counter) -> Iterator["Triple | DataError"]:
    for where, record in _records(source):
        if isinstance(record, DataError):
            yield record
            continue
        try:
            yield parse_record(record, where, source.fields, read_negatives)
        except DataError as e:
            yield e


# ---------------------------------------------------------------- squad

def squad_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*.json") if p.is_file()) if path.is_dir() else [path]


def _squad(source, read_negatives: bool, notes: Counter) -> Iterator["Triple | DataError"]:
    path = Path(source.path)
    files = squad_files(path)
    if not files:
        raise DataError(f"{path}: format squad reads .json files; the directory holds none")
    for file in files:
        try:
            top = json.loads(read_text(file, source.encoding))
        except json.JSONDecodeError as e:  # one broken file spoils all of it
            raise DataError(f"{file}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(top, dict) or not isinstance(top.get("data"), list):
            raise DataError(f"{file}: format squad expects SQuAD JSON, an object whose 'data' is a list of articles "
                            f"({{'title', 'paragraphs': [{{'context', 'qas': [{{'question', ...}}]}}]}})")
        for a, article in enumerate(top["data"]):
            yield from _squad_article(article, f"{file}: data[{a}]", read_negatives, notes)


def _squad_article(article, where: str, read_negatives: bool, notes: Counter) -> Iterator["Triple | DataError"]:
    try:
        if not isinstance(article, dict):
            raise DataError(f"{where}: expected an article object, found {type(article).__name__}")
        title = text_field(article, "title", "title", where)
        paragraphs = article.get("paragraphs")
        if not isinstance(paragraphs, list):
            raise DataError(f"{where}: 'paragraphs' must be a list of {{'context', 'qas'}} objects")
        contexts = []
        for p, para in enumerate(paragraphs):
            if not isinstance(para, dict):
                raise DataError(f"{where}.paragraphs[{p}]: expected an object, found {type(para).__name__}")
            contexts.append(text_field(para, "context", "context", f"{where}.paragraphs[{p}]"))
    except DataError as e:  # the whole article is unusable: its paragraphs are every question's negatives
        yield e
        return
    for p, para in enumerate(paragraphs):
        qas = para.get("qas", [])
        if not isinstance(qas, list):
            yield DataError(f"{where}.paragraphs[{p}]: 'qas' must be a list of question objects")
            continue
        # The article's other paragraphs, starting with the next one: the nearest in topic come first.
        negatives = _distinct(contexts[p + 1:] + contexts[:p], leave_out=contexts[p]) if read_negatives else ()
        for q, qa in enumerate(qas):
            here = f"{where}.paragraphs[{p}].qas[{q}]"
            if not isinstance(qa, dict):
                yield DataError(f"{here}: expected a question object, found {type(qa).__name__}")
                continue
            try:
                question = text_field(qa, "question", "question", here)
            except DataError as e:
                yield e
                continue
            if qa.get("is_impossible"):  # SQuAD 2.0 / KLUE-MRC: the paragraph does not answer it
                notes["unanswerable"] += 1
                continue
            yield Triple(question, (contexts[p],), negatives, title)


# ---------------------------------------------------------------- labelled pairs: nli, pairs

def label_map(source) -> tuple[dict[str, str], bool]:
    """label value (as text) -> class, and whether the mapping is complete (every class of the format
    listed, so an unlisted value is a bad row rather than one to leave out)."""
    labels = source.labels or DEFAULT_LABELS.get(source.format, {})
    mapping = {}
    for cls, values in labels.items():
        for v in values if isinstance(values, list) else [values]:
            mapping[str(v).strip()] = cls
    return mapping, set(LABEL_CLASSES[source.format]) <= set(labels)


def _grouped_pairs(source, read_negatives: bool, notes: Counter) -> Iterator["Triple | DataError"]:
    """Rows (query, document, label) grouped by query: the positive class's documents are the positives,
    the negative class's the hard negatives; other classes (neutral) are left out."""
    positive_class, negative_class = LABEL_CLASSES[source.format][:2]
    mapping, complete = label_map(source)
    f = source.fields
    groups: dict[str, tuple[list, list, str]] = {}  # query -> (positives, negatives, unit), in first-seen order
    for where, record in _records(source):
        if isinstance(record, DataError):
            yield record
            continue
        try:
            query = text_field(record, "query", f.query, where)
            document = text_field(record, "document", f.document, where)
            if record.get(f.label) is None:
                raise DataError(f"{where}: missing field {_label('label', f.label)}")
            value = str(record[f.label]).strip()
            cls = mapping.get(value)
            if cls is None and complete:
                raise DataError(f"{where}: label {value!r} in field {_label('label', f.label)} is in none of the "
                                f"source's labels: {_show_labels(source)}")
            unit = _unit(record, f, where, query)
        except DataError as e:
            yield e
            continue
        positives, negatives, _ = groups.setdefault(query, ([], [], unit))
        if cls not in (positive_class, negative_class):
            notes[f"rows labelled {cls or value}"] += 1
        elif document == query:  # a text is trivially its own paraphrase; it teaches nothing
            notes["pairs of identical texts"] += 1
        else:
            (positives if cls == positive_class else negatives).append(document)
    for query, (positives, negatives, unit) in groups.items():
        if not positives:
            notes["premises without an entailment" if source.format == "nli" else "queries without a positive"] += 1
            continue
        yield Triple(query, _distinct(positives), _distinct(negatives) if read_negatives else (), unit)


def _show_labels(source) -> str:
    labels = source.labels or DEFAULT_LABELS.get(source.format, {})
    return ", ".join(f"{cls}: {values}" for cls, values in labels.items())


# ---------------------------------------------------------------- scored_pairs

def _scored_pairs(source, read_negatives: bool, notes: Counter) -> Iterator["Triple | DataError"]:
    f = source.fields
    for where, record in _records(source):
        if isinstance(record, DataError):
            yield record
            continue
        try:
            query = text_field(record, "query", f.query, where)
            document = text_field(record, "document", f.document, where)
            raw = record.get(f.score)
            if raw is None:
                raise DataError(f"{where}: missing field {_label('score', f.score)}")
            try:
                score = float(raw)
            except (TypeError, ValueError):
                score = math.nan
            if isinstance(raw, bool) or not math.isfinite(score):
                raise DataError(f"{where}: field {_label('score', f.score)} is not a number: {raw!r}")
            unit = _unit(record, f, where, query)
        except DataError as e:
            yield e
            continue
        if score < source.min_score:
            notes["pairs below min_score"] += 1
            continue
        if document == query:  # a text is trivially its own paraphrase; it teaches nothing
            notes["pairs of identical texts"] += 1
            continue
        yield Triple(query, (document,), (), unit)


# ---------------------------------------------------------------- paraphrase

def _paraphrase(source, read_negatives: bool, notes: Counter) -> Iterator["Triple | DataError"]:
    f = source.fields
    groups: dict[str, list[str]] = {}  # unit -> members, in first-seen order
    size = source.group_size
    n = 0
    for n, (where, record) in enumerate(_records(source), 1):
        # With group_size, a bad record still takes its place, so the groups after it stay aligned.
        key = None
        try:
            if isinstance(record, DataError):
                raise record
            text = text_field(record, "query", f.query, where)
            if f.group:
                if record.get(f.group) is None:
                    raise DataError(f"{where}: missing field {_label('group', f.group)}")
                key = str(record[f.group])
        except DataError as e:
            yield e
            continue
        if key is None:
            key = f"#{(n - 1) // size}"  # renamed below to the group's first sentence
        groups.setdefault(key, []).append(text)
    if size and n % size:
        yield DataError(f"{source.path}: {n} records do not make groups of group_size={size}; the last group has "
                        f"{n % size} (check group_size, or that no line is missing)")
    for key, members in groups.items():
        # A positional group is named by its first sentence, so its side does not depend on where it sits.
        unit = key if f.group else members[0]
        distinct = dict.fromkeys(members)
        if len(distinct) < len(members):
            notes["repeated sentences in a group"] += len(members) - len(distinct)
        for member in distinct:
            positives = _distinct(members, leave_out=member)
            if not positives:
                notes["sentences without another in their group"] += 1
                continue
            yield Triple(member, positives, (), unit)


READERS: dict[str, Callable[..., Iterator]] = {
    "triples": _triples, "squad": _squad, "nli": _grouped_pairs, "pairs": _grouped_pairs,
    "scored_pairs": _scored_pairs, "paraphrase": _paraphrase,
}
