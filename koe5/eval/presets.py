"""Named presets for the three Korean benchmarks of the original KoE5 table, and how to fetch them.

A preset records where a user with internet gets the benchmark. `koe5 bench fetch NAME` downloads it
from the Hugging Face hub and writes it as a BEIR directory under `benchmark_root()`, which
`load_benchmark(NAME)` then reads. Hub ids are those MTEB's task definitions use (MTEB task names in
`mteb_task`, revisions as MTEB pins them); `uncertain` says what could not be verified offline.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str  # Hugging Face dataset id
    split: str  # the split MTEB evaluates
    kind: str  # "beir": corpus/queries/qrels configs; "qa-pairs": question/answer rows (answers = corpus)
    mteb_task: str
    source: str  # where the data comes from, for people without the hub
    subset: str | None = None  # dataset config for "qa-pairs" data
    revision: str | None = None  # the hub revision MTEB pins, when it pins one
    uncertain: str = ""  # what has not been verified


PRESETS: dict[str, Preset] = {
    "ko-strategyqa": Preset(
        name="ko-strategyqa", hub_id="taeminlee/Ko-StrategyQA", split="dev", kind="beir",
        mteb_task="Ko-StrategyQA", revision="d243889a3eb6654029dbd7e7f9319ae31d58f97c",
        source="Korean translation of StrategyQA; https://huggingface.co/datasets/taeminlee/Ko-StrategyQA",
    ),
    "autorag": Preset(
        name="autorag", hub_id="yjoonjang/markers_bm", split="test", kind="beir",
        mteb_task="AutoRAGRetrieval", revision="fd7df84ac089bbec763b1c6bb1b56e985df5cc5c",
        source="AutoRAG Korean embedding benchmark; parquet originals (qa*.parquet, *corpus*.parquet, load them "
               "with --benchmark DIR) in https://github.com/Marker-Inc-Korea/AutoRAG-example-korean-embedding-benchmark",
        uncertain="older MTEB releases name the hub id nlpai-lab/markers_bm",
    ),
    "publichealthqa": Preset(
        name="publichealthqa", hub_id="xhluca/publichealth-qa", split="test", kind="qa-pairs",
        mteb_task="PublicHealthQA", subset="korean",
        source="multilingual public-health FAQ (CDC, WHO), Korean subset; "
               "https://huggingface.co/datasets/xhluca/publichealth-qa",
    ),
}


def mteb_preset(benchmark_name: str) -> Preset | None:
    """The preset a benchmark name stands for, by koe5's preset name or by its MTEB task name (any case);
    None for other benchmarks. koe5 writes MTEB result files under the preset's MTEB task name."""
    key = benchmark_name.lower()
    return next((p for p in PRESETS.values() if key in (p.name.lower(), p.mteb_task.lower())), None)


def benchmark_root() -> str:
    """Where fetched presets live: $KOE5_BENCHMARKS, else ~/.cache/koe5/benchmarks."""
    return os.environ.get("KOE5_BENCHMARKS") or os.path.join(os.path.expanduser("~"), ".cache", "koe5", "benchmarks")


def preset_dir(name: str) -> str:
    return os.path.join(benchmark_root(), name)


class FetchError(RuntimeError):
    """The download failed; the message says why and what to do instead."""


def fetch(name: str, load_dataset=None) -> str:
    """Download preset `name` and write it as a BEIR directory; returns the directory.

    `load_dataset` defaults to `datasets.load_dataset` (a parameter so tests can stand in for the hub).
    """
    preset = PRESETS[name]
    if load_dataset is None:
        from datasets import load_dataset
    try:
        if preset.kind == "beir":
            corpus = load_dataset(preset.hub_id, "corpus", revision=preset.revision)
            queries = load_dataset(preset.hub_id, "queries", revision=preset.revision)
            qrels = load_dataset(preset.hub_id, "default", split=preset.split, revision=preset.revision)
            corpus_rows = _first_split(corpus)
            query_rows = _first_split(queries)
            qrel_rows = [(str(r["query-id"]), str(r["corpus-id"]), int(r["score"])) for r in qrels]
        else:
            rows = load_dataset(preset.hub_id, preset.subset, split=preset.split, revision=preset.revision)
            corpus_rows, query_rows, qrel_rows = _qa_pairs_to_beir(rows)
    except Exception as e:  # the hub client raises many types for "no network"; report them all plainly
        raise FetchError(
            f"could not download '{name}' ({preset.hub_id}) from the Hugging Face hub: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}\n"
            f"What to do: on a machine with internet run `koe5 bench fetch {name}` and copy "
            f"{preset_dir(name)} to the same place here (or set $KOE5_BENCHMARKS); or get the data yourself "
            f"({preset.source}) and pass its directory to --benchmark."
            + (f"\nNote: {preset.uncertain}; check the id if the hub says it does not exist." if preset.uncertain else "")
        ) from None
    return write_beir(preset_dir(name), corpus_rows, query_rows, qrel_rows)


def _first_split(dataset_dict) -> list[dict]:
    # BEIR-style hub datasets keep corpus and queries in a single split whose name varies.
    split = next(iter(dataset_dict.values())) if hasattr(dataset_dict, "values") else dataset_dict
    return list(split)


def _qa_pairs_to_beir(rows) -> tuple[list[dict], list[dict], list[tuple[str, str, int]]]:
    """Question/answer rows as MTEB reads them: each distinct answer is a passage, each distinct
    question a query relevant to every answer it was paired with; rows missing either are skipped."""
    doc_ids: dict[str, str] = {}
    query_ids: dict[str, str] = {}
    qrels: dict[tuple[str, str], int] = {}
    for row in rows:
        question, answer = row.get("question"), row.get("answer")
        if question is None or answer is None:
            continue
        qid = query_ids.setdefault(question, f"Q{len(query_ids)}")
        did = doc_ids.setdefault(answer, f"D{len(doc_ids)}")
        qrels[(qid, did)] = 1
    corpus = [{"_id": d, "title": "", "text": t} for t, d in doc_ids.items()]
    queries = [{"_id": q, "text": t} for t, q in query_ids.items()]
    return corpus, queries, [(q, d, g) for (q, d), g in qrels.items()]


def write_beir(root: str, corpus: list[dict], queries: list[dict], qrels: list[tuple[str, str, int]]) -> str:
    os.makedirs(os.path.join(root, "qrels"), exist_ok=True)
    with open(os.path.join(root, "corpus.jsonl"), "w", encoding="utf-8") as f:
        for r in corpus:
            f.write(json.dumps({"_id": str(r["_id"]), "title": r.get("title") or "", "text": r["text"]},
                               ensure_ascii=False) + "\n")
    with open(os.path.join(root, "queries.jsonl"), "w", encoding="utf-8") as f:
        for r in queries:
            f.write(json.dumps({"_id": str(r["_id"]), "text": r["text"]}, ensure_ascii=False) + "\n")
    with open(os.path.join(root, "qrels", "test.tsv"), "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, did, score in qrels:
            f.write(f"{qid}\t{did}\t{score}\n")
    return root
