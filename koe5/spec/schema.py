"""The experiment spec schema: every key, its type, its default and a one-line description.

This file is the single source of truth for what a spec may contain. The loader validates against it,
`docs/spec.md` is generated from it, and the rest of koe5 reads a `Spec` instance, never raw YAML.

Conventions:
- `field(default=..., metadata={"doc": ...})` documents a key; `REQUIRED` marks keys without a default.
- Closed enumerations are `Literal[...]`.
- Relative paths in a spec file are resolved against that file's directory by the loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

REQUIRED: Any = object()  # sentinel: the key has no default and must be given


def doc(text: str, default: Any = REQUIRED, *, resume_safe: bool = False, **kw: Any) -> Any:
    """A dataclass field carrying its one-line description. `resume_safe` marks keys that may change when a
    run resumes from a checkpoint: they change what is logged, saved or evaluated, never the training math."""
    meta = {"doc": text, "resume_safe": resume_safe}
    if default is REQUIRED:
        return field(metadata={**meta, "required": True}, **kw)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelSpec:
    name_or_path: str = doc("Hugging Face hub id, local model directory, or `builtin:tiny-ko-bert` (the demo model).")
    pooling: Literal["mean", "cls"] = doc("How token states become one embedding.", "mean")
    normalize: bool = doc("L2-normalize embeddings, so scores are cosine similarities.", True)
    query_prefix: str = doc("Text put before every query (E5 convention).", "query: ")
    passage_prefix: str = doc("Text put before every passage (E5 convention).", "passage: ")
    query_max_len: int = doc("Maximum query length in tokens, prefix included.", 32)
    passage_max_len: int = doc("Maximum passage length in tokens, prefix included.", 256)
    dropout: Optional[float] = doc("Dropout probability for hidden and attention layers; null keeps the model's own.", None)
    attention: Literal["padded", "varlen"] = doc(
        "How training runs attention (BERT / XLM-R encoders). padded: the padded batch as it is (the reference). "
        "varlen: the rows' real tokens packed into one sequence with segment offsets, attention within each row "
        "(torch's varlen_attn, FlashAttention, on a GPU: needs train.precision bf16 or fp16; on the CPU a "
        "block-diagonal-mask reference, for tests), then mean/CLS pooling per row: the same embeddings without "
        "the pad tokens' work. The kernel has no attention dropout, so varlen trains with attention dropout 0 "
        "(hidden dropout stays; the trainer says so when the model had any). Evaluation always runs padded.",
        "padded")


@dataclass
class FieldsSpec:
    query: str = doc("Column holding the query (a string).", "query")
    document: str = doc("Column holding the positive document: a string, or a list of positives (see data.positive).",
                        "document")
    hard_negative: Optional[str] = doc(
        "Column holding the hard negatives: a string or a list of strings (may be shorter than data.hard_negatives, "
        "even empty); null = the source has no negatives column.", "hard_negative")
    label: str = doc("Formats nli and pairs: column holding the label that `labels` maps.", "label")
    score: str = doc("Format scored_pairs: column holding the similarity score.", "score")
    group: Optional[str] = doc("Format paraphrase: column naming each sentence's group (instead of `group_size`).",
                               None)
    id: Optional[str] = doc("Column identifying a record's unit for `holdout` (e.g. a query id); null = the query "
                            "text. Formats squad, nli and paraphrase have their own units (article title, premise, "
                            "group).", None)
    scores: Optional[str] = doc(
        "Format triples: column holding the teacher's scores of the record's documents for loss.distill_weight: "
        "one number per document, each positive then each hard negative in order (a list, or in CSV/TSV a cell "
        "like `[0.9, 0.2]`); null = no teacher scores (the source's rows stay out of the distillation term).",
        None)


@dataclass
class HoldoutSpec:
    fraction: float = doc("Share of the source's units (article, query id, premise, group: see fields.id) put on the "
                          "bench side, by a hash of (seed, unit), never by position; 0 = no split.", 0.0)
    side: Literal["train", "bench"] = doc("Which side this source reads: `train` never sees a query or passage of a "
                                          "bench-side unit.", "train")
    seed: int = doc("Seed of the split; the same seed and fraction give the same sides everywhere.", 0)


@dataclass
class MineSpec:
    negatives: int = doc("Hard negatives to mine per row from this source's own passages, with the mining model, "
                         "before training (koe5/data/mine_source.py); they join the row's own negatives in the order "
                         "`first` says. 0 = no mining.", 0)
    first: Literal["own", "mined"] = doc(
        "Which of a row's negatives train first (data.hard_negatives takes them in order): `own` = the row's own "
        "(a squad article's other paragraphs, an NLI contradiction, a triples file's hard_negative), then the "
        "mined ones; `mined` = the mined ones, then the row's own that mining did not pick, e.g. a KorQuAD "
        "question's nearest paragraphs under the mining model instead of the article's next one.", "own")
    ranks: list[int] = doc("[first, last]: the 1-based rank range candidates come from; skipping the top ranks "
                           "avoids unlabelled positives.", [3, 50])
    margin: float = doc("False-negative filter: a candidate must score below margin x the query's best positive "
                        "score (as sentence-transformers' relative margin).", 0.95)
    margin_abs: Optional[float] = doc("Absolute filter instead of `margin`: below the best positive's score minus "
                                      "this; null = use margin.", None)
    model: Optional[str] = doc("The mining model (hub id or directory); null = model.name_or_path, the model "
                               "being trained, as it is before training.", None)
    batch_size: int = doc("Encoding batch size while mining.", 64)


@dataclass
class SourceSpec:
    path: str = doc("Training triples: a .jsonl, .json (array or JSON lines), .parquet, .csv or .tsv file; a directory "
                    "of them; a dataset saved with `save_to_disk`; or `hub:owner/name` on the dataset hub.")
    weight: float = doc("Relative sampling weight of this source.", 1.0)
    name: Optional[str] = doc("Short name shown in the data mix; defaults to the file name.", None)
    fields: FieldsSpec = doc("Which columns hold the query, the positive(s) and the hard negatives.", None)
    split: str = doc("Split to read from a save_to_disk DatasetDict or a hub dataset.", "train")
    format: Literal["triples", "squad", "nli", "scored_pairs", "paraphrase", "pairs"] = doc(
        "How records become (query, positives, hard negatives) (koe5/data/formats.py): `triples` = one record per "
        "query; `squad` = SQuAD-style JSON, question -> its paragraph, the article's other paragraphs as hard "
        "negatives; `nli` = rows grouped by premise, entailments as positives, contradictions as negatives; "
        "`scored_pairs` = a pair is a positive when its score >= min_score; `paraphrase` = each member of a group "
        "is a query whose positives are the other members; `pairs` = labelled pairs grouped by query, "
        "labels.positive rows as positives, labels.negative rows as hard negatives.", "triples")
    encoding: str = doc("Text encoding of CSV/TSV/JSON files (utf-8, cp949, euc-kr, ...); a file starting with a UTF-8 "
                        "byte-order mark is read as UTF-8 whatever is declared.", "utf-8")
    file_type: Optional[Literal["jsonl", "json", "parquet", "csv", "tsv"]] = doc(
        "Read the file (or a directory's .txt files and files of this type) as this type whatever the extension, "
        "e.g. a tab-separated `.txt`; null = by extension. TSV is read literally (a quote is text, as in published "
        "TSVs); CSV follows CSV quoting.", None)
    columns: Optional[list[str]] = doc(
        "Names of the columns of a CSV/TSV file that has no header row, in order; null = the first row is the header.",
        None)
    labels: dict = doc(
        "Formats nli and pairs: label value(s) of each class, compared as text (`0` matches \"0\"). nli: "
        "`entailment`, `contradiction`, `neutral` (default: those words); pairs: `positive` (required), `negative`. "
        "When every class of the format is listed, any other value is a bad row; otherwise unlisted values are "
        "left out.", {})
    min_score: Optional[float] = doc("Format scored_pairs: the least score that makes a pair a positive.", None)
    group_size: Optional[int] = doc("Format paraphrase: each run of this many consecutive records is one group "
                                    "(or name a group column in fields.group).", None)
    holdout: HoldoutSpec = doc("Split the source by unit into a benchmark side and a training side "
                               "(`koe5 data bench` writes the benchmark).", None)
    mine: MineSpec = doc("Mine hard negatives for this source's rows (pair and QA sets publish none).", None)


@dataclass
class DataSpec:
    sources: list[SourceSpec] = doc("Training sources.")
    hard_negatives: int = doc(
        "Hard negatives used per query (0 = in-batch negatives only). From a longer list, each epoch takes the next "
        "N in turn, so successive epochs see different negatives.", 1)
    positive: Literal["first", "sample"] = doc(
        "With several positives per query: `first` always trains on the first; `sample` picks one per epoch "
        "(deterministic in seed, epoch and row).", "first")
    one_source_per_batch: bool = doc(
        "Draw each global batch from a single source (chosen by the mix), then slice it across ranks, so gathered "
        "negatives share a domain.", False)
    mixing: Literal["proportional", "weighted", "temperature"] = doc(
        "How sources share each batch: `proportional` = every example equally likely (one shuffled pass per "
        "epoch when all weights are 1; otherwise p(source) ~ size x weight); `weighted` = p(source) ~ weight; "
        "`temperature` = p(source) ~ (size x weight)^(1/mixing_temperature).", "proportional")
    mixing_temperature: float = doc("T for `mixing: temperature`; larger T flattens the mix.", 2.0)
    leakage: Literal["error", "warn", "ignore"] = doc(
        "What to do when a training query or document equals (after normalizing whitespace, punctuation and "
        "case) a query of an evaluation benchmark.", "warn")
    on_error: Literal["error", "skip"] = doc(
        "A bad training line (malformed JSON, missing/empty field, wrong type, not UTF-8): `error` stops the run "
        "naming file:line and the field; `skip` leaves it out and records the count per file with the run.", "error")
    prefetch: int = doc(
        "Batches built ahead by a background thread (the global batch, this rank's slice, padding) while the "
        "current step trains; on CUDA they are built in page-locked memory and copied without blocking. The "
        "same batches in the same order as 0, which builds each one when the step needs it (koe5/data/prefetch.py).",
        0, resume_safe=True)


@dataclass
class LossSpec:
    name: Literal["infonce", "symmetric_infonce"] = doc(
        "Contrastive loss: `infonce` = in-batch plus hard negatives, query -> document; `symmetric_infonce` = "
        "the average of that and document -> query over the batch's queries (see koe5/train/loss.py).", "infonce")
    temperature: float = doc("Softmax temperature tau; scores are divided by it.", 0.02)
    cross_device_negatives: bool = doc("Gather every rank's embeddings so all ranks share one pool of negatives.", True)
    mask_duplicates: bool = doc("Mask candidates whose document equals the query's positive (same text hash).", True)
    guide_model: Optional[str] = doc(
        "Guided false-negative filtering (GISTEmbed): a frozen model (hub id, directory or "
        "`builtin:tiny-ko-bert`; may be model.name_or_path itself) that scores every in-batch candidate; "
        "candidates it rates above the query's positive (less guide_margin) are masked as likely false "
        "negatives. It must use the model's tokenizer; it gets the model's prefixes and pooling, normalized. "
        "As sentence-transformers' (Cached)GISTEmbedLoss with contrast_anchors and contrast_positives off "
        "(koe5/train/loss.py). null = no guide.", None)
    guide_margin_strategy: Literal["absolute", "relative"] = doc(
        "How guide_margin lowers the threshold: `absolute` masks a candidate the guide scores above "
        "positive - guide_margin; `relative` above positive - |positive| x guide_margin (cosine scores).",
        "absolute")
    guide_margin: float = doc(
        "The guide's margin, >= 0 (below 2 absolute, below 1 relative); 0 masks only candidates the guide rates "
        "strictly above the positive, larger masks more.", 0.0)
    guide_mask: Optional[list[Literal["in_batch", "hard_negatives", "queries"]]] = doc(
        "Which candidates the guide may mask: `in_batch` (other queries' positives), `hard_negatives` (every "
        "hard negative in the pool), `queries` (the other queries, in symmetric_infonce's document -> query "
        "direction); null = every kind the loss has.", None)
    matryoshka_dims: Optional[list[int]] = doc(
        "Matryoshka embeddings: the loss is the weighted sum of the loss at each of these widths, on embeddings "
        "truncated to their first d dimensions and renormalized (as sentence-transformers' MatryoshkaLoss); list "
        "the model's full width to train it too, e.g. [384, 256, 128, 64]. Needs model.normalize. null = the "
        "full embeddings only.", None)
    matryoshka_weights: Optional[list[float]] = doc(
        "One weight (> 0) per entry of matryoshka_dims, in the same order; null = 1 each.", None)
    distill_weight: Optional[float] = doc(
        "Score distillation from stored teacher scores (a source's fields.scores): adds distill_weight x the mean "
        "over scored queries of KL(teacher || student) over each query's own positive and hard negatives "
        "(documents without a teacher score left out; at every Matryoshka width; koe5/train/loss.py); the "
        "student's temperature is loss.temperature. Needs data.hard_negatives >= 1. > 0 turns it on; null or 0 = off.",
        None)
    distill_temperature: float = doc(
        "Score distillation: the teacher's softmax temperature; teacher probabilities = softmax(scores / it).", 1.0)


@dataclass
class CacheSpec:
    enabled: bool = doc("Use GradCache: embed in chunks without grad, then replay chunk by chunk.", True)
    chunk_size: int = doc("Rows per GradCache chunk (per rank).", 32)
    chunk_tokens: Optional[int] = doc(
        "Token budget per chunk instead of a row count: rows are sorted by length and packed so that "
        "rows x padded length <= chunk_tokens (a longer single row gets a chunk of its own).", None)


@dataclass
class KeepBestSpec:
    metric: Optional[str] = doc(
        "Export the best step evaluated during training (eval.every) instead of the last, by this metric, written "
        "NAME@K (ndcg, recall, precision, f1, mrr or map; K one of eval.k; higher is better, a tie keeps the "
        "earlier step); the registry records which step won and its value. null = export the last step.", None)
    benchmark: Optional[str] = doc("The benchmark (one evaluated during training, see eval.during) whose metric "
                                   "picks the best step; null = the first one evaluated during training.", None)
    patience: Optional[int] = doc(
        "Early stopping: end the run (finished, not failed) after this many evaluations in a row without a "
        "better value, exporting the best step; null = train to the end.", None)


@dataclass
class TrainSpec:
    batch_size: int = doc("Global batch size, counted in queries (summed over all ranks).", 32)
    max_steps: Optional[int] = doc("Stop after this many optimizer steps (wins over epochs).", None)
    epochs: Optional[float] = doc("Number of passes over the training data, if max_steps is null.", None)
    lr: float = doc("Peak learning rate (AdamW).", 2e-5)
    weight_decay: float = doc("AdamW weight decay.", 0.01)
    adam_eps: float = doc("AdamW epsilon; 1e-6 keeps near-zero gradients from being amplified into full-size steps.", 1e-8)
    warmup_ratio: float = doc("Fraction of steps with linear warmup from 0 to lr.", 0.1)
    scheduler: Literal["linear", "cosine", "constant"] = doc("Learning-rate decay after warmup.", "linear")
    grad_clip: Optional[float] = doc("Clip the global gradient norm to this value; null disables.", 1.0)
    precision: Literal["fp32", "bf16", "fp16"] = doc(
        "Training precision. bf16: float32 master weights and gradients, forwards under bf16 autocast, so "
        "GradCache's per-chunk gradients accumulate in float32. fp16: DeepSpeed's fp16 mixed precision with "
        "loss scaling (its gradients accumulate in fp16).", "fp32")
    device: Literal["auto", "cpu", "cuda"] = doc("Where to train; auto picks cuda when available.", "auto")
    gradient_checkpointing: bool = doc(
        "Recompute each layer's activations in backward. Redundant with GradCache (whose memory is already "
        "one chunk's activations); useful only to fit larger chunks, at ~30% more compute.", False)
    compile: bool = doc(
        "Compile the backbone with torch.compile (inductor) once, before training; chunk shapes go dynamic after "
        "the first change, and the training log counts the compiles (`compiles`). Not with ZeRO-3, whose "
        "parameter hooks break the graph (koe5/train/compile.py).", False)
    freeze_embeddings: bool = doc(
        "Keep the word-embedding matrix fixed (positions, layers and norms still train). For multilingual-e5 it "
        "holds most parameters (96M of mE5-small's 118M), nearly all rows of which a Korean batch never "
        "touches, so freezing it removes most of the gradient, optimizer memory and update time.", False)
    log_every: int = doc("Write a diagnostics row every this many steps (and at the first and last step).", 10,
                         resume_safe=True)
    save_every: Optional[int] = doc(
        "Write a checkpoint (weights, optimizer, scheduler, RNG states, step) every this many steps; null "
        "writes none. A run killed after a checkpoint resumes from it exactly.", None, resume_safe=True)
    keep_checkpoints: int = doc("How many of the newest checkpoints to keep.", 2, resume_safe=True)
    keep_best: KeepBestSpec = doc("Best-step selection and early stopping on evaluations during training.", None)
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = doc(
        "Experiment trackers that also receive the run, each through its own library (`pip install "
        "koe5[trackers]`; koe5/track.py): the flattened resolved spec and its hash as params, every training "
        "scalar of train_log.jsonl at its step (`train/loss`, ...; rank 0), the evaluation metrics at the last "
        "step (`eval/<benchmark>/ndcg@10`, fractions; MLflow names it `ndcg_at_10`) and the exported model as "
        "an artifact (MLflow, W&B). TensorBoard writes to <run dir>/tensorboard, MLflow to "
        "$MLFLOW_TRACKING_URI or <output_dir>/mlruns/mlflow.db, W&B to the project $WANDB_PROJECT or the "
        "experiment name. Not part of the spec hash.", [], resume_safe=True)


@dataclass
class DeepSpeedSpec:
    zero_stage: Literal[0, 1, 2, 3] = doc("DeepSpeed ZeRO stage.", 0)
    offload_optimizer: bool = doc("Keep optimizer states and the update on the CPU (needs zero_stage >= 1).", False)
    offload_params: bool = doc("Keep parameters on the CPU between uses (needs zero_stage 3).", False)
    extra: dict = doc("Raw DeepSpeed config keys merged into the derived config.", {})


@dataclass
class LaunchSpec:
    backend: Literal["auto", "local", "deepspeed", "torchrun"] = doc(
        "How training processes start; auto = local for one process, deepspeed for more.", "auto")
    nproc_per_node: int = doc("Training processes per node.", 1)
    nnodes: int = doc("Nodes; the world size is nnodes x nproc_per_node.", 1)
    hostfile: Optional[str] = doc("DeepSpeed hostfile (`host slots=N` lines) for several nodes.", None,
                                  resume_safe=True)
    master_addr: str = doc("Address of the rank-0 node (rendezvous).", "127.0.0.1", resume_safe=True)
    master_port: Optional[int] = doc("Rendezvous port; null picks a free one (one node) or 29500.", None,
                                     resume_safe=True)


def world_size(spec: "Spec") -> int:
    """Training processes over all nodes."""
    return spec.launch.nproc_per_node * spec.launch.nnodes


@dataclass
class BenchmarkSpec:
    name: str = doc("Name shown in results.")
    path: str = doc("Benchmark directory (BEIR layout: corpus.jsonl, queries.jsonl, qrels/test.tsv).")


@dataclass
class EvalSpec:
    benchmarks: list[BenchmarkSpec] = doc("Benchmarks evaluated after training.", [], resume_safe=True)
    k: list[int] = doc("Cut-offs for every metric.", [1, 3, 5, 10], resume_safe=True)
    batch_size: int = doc("Encoding batch size.", 64, resume_safe=True)
    dtype: Literal["fp32", "bf16"] = doc(
        "The weights' dtype while encoding for evaluation. fp32: float32 weights (on a GPU, matmuls under bf16 "
        "autocast, as before). bf16: the weights cast to bfloat16 (half the memory, no per-op casts; pooling and "
        "normalization stay float32), meant for the GPU (it works on the CPU, slowly). Part of the embedding "
        "cache key and of a baseline's identity, so the two never share embeddings or runs.", "fp32",
        resume_safe=True)
    query_max_len: Optional[int] = doc(
        "Query length in tokens (prefix included) at evaluation; null = the model's own maximum, as MTEB "
        "evaluates (model.query_max_len is the training truncation only).", None, resume_safe=True)
    passage_max_len: Optional[int] = doc(
        "Passage length in tokens (prefix included) at evaluation; null = the model's own maximum, so long "
        "documents are not cut at the training truncation (model.passage_max_len).", None, resume_safe=True)
    baseline: bool = doc("Also evaluate the model before training and record it as a baseline run.", False,
                         resume_safe=True)
    every: Optional[int] = doc(
        "Also evaluate during training, every this many optimizer steps and at the last step (rank 0 of the "
        "trainer, into <run dir>/eval_log.jsonl, folded into the registry with each step); null = only after "
        "training.", None, resume_safe=True)
    during: list[str] = doc(
        "Names of eval.benchmarks evaluated during training (a large benchmark every eval.every steps costs "
        "time); empty = all of them. After training every benchmark is evaluated as usual.", [], resume_safe=True)
    dims: Optional[list[int]] = doc(
        "Matryoshka evaluation: also evaluate at these embedding widths (query and passage embeddings truncated "
        "to their first d dimensions and renormalized, as sentence-transformers' truncate_dim), the trained "
        "model and the baseline alike, each width recorded as its own metric rows; the full width is always "
        "evaluated. null = loss.matryoshka_dims (none without it).", None, resume_safe=True)


@dataclass
class RegistrySpec:
    path: Optional[str] = doc("DuckDB registry file; null = $KOE5_REGISTRY or registry/koe5.duckdb.", None)


@dataclass
class Spec:
    name: str = doc("Experiment name.")
    model: ModelSpec = doc("The encoder.")
    data: DataSpec = doc("Training data.")
    seed: int = doc("Seed for weights, data order and dropout.", 0)
    output_dir: str = doc("Directory under which each run gets its own folder.", "runs")
    tags: list[str] = doc("Free-form labels for filtering runs.", [], resume_safe=True)
    loss: LossSpec = doc("The contrastive loss.", None)
    cache: CacheSpec = doc("GradCache settings.", None)
    train: TrainSpec = doc("Optimisation settings.", None)
    deepspeed: DeepSpeedSpec = doc("DeepSpeed engine settings.", None)
    launch: LaunchSpec = doc("Process launch settings.", None)
    eval: EvalSpec = doc("Evaluation after training (and during it, with eval.every).", None)
    registry: RegistrySpec = doc("Where runs are recorded.", None)

    def __post_init__(self) -> None:
        # Sub-sections with only defaulted keys may be omitted; fill them here so readers never see None.
        for name, cls in (("loss", LossSpec), ("cache", CacheSpec), ("train", TrainSpec),
                          ("deepspeed", DeepSpeedSpec), ("launch", LaunchSpec), ("eval", EvalSpec),
                          ("registry", RegistrySpec)):
            if getattr(self, name) is None:
                setattr(self, name, cls())
