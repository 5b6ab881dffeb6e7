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


@dataclass
class FieldsSpec:
    query: str = doc("Column holding the query (a string).", "query")
    document: str = doc("Column holding the positive document: a string, or a list of positives (see data.positive).",
                        "document")
    hard_negative: str = doc("Column holding the hard negatives: a string or a list of strings.", "hard_negative")


@dataclass
class SourceSpec:
    path: str = doc("Training triples: a .jsonl, .json (array or JSON lines), .parquet, .csv or .tsv file; a directory "
                    "of them; a dataset saved with `save_to_disk`; or `hub:owner/name` on the dataset hub.")
    weight: float = doc("Relative sampling weight of this source.", 1.0)
    name: Optional[str] = doc("Short name shown in the data mix; defaults to the file name.", None)
    fields: FieldsSpec = doc("Which columns hold the query, the positive(s) and the hard negatives.", None)
    split: str = doc("Split to read from a save_to_disk DatasetDict or a hub dataset.", "train")


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


@dataclass
class LossSpec:
    name: Literal["infonce", "symmetric_infonce"] = doc(
        "Contrastive loss: `infonce` = in-batch plus hard negatives, query -> document; `symmetric_infonce` = "
        "the average of that and document -> query over the batch's queries (see koe5/train/loss.py).", "infonce")
    temperature: float = doc("Softmax temperature tau; scores are divided by it.", 0.02)
    cross_device_negatives: bool = doc("Gather every rank's embeddings so all ranks share one pool of negatives.", True)
    mask_duplicates: bool = doc("Mask candidates whose document equals the query's positive (same text hash).", True)


@dataclass
class CacheSpec:
    enabled: bool = doc("Use GradCache: embed in chunks without grad, then replay chunk by chunk.", True)
    chunk_size: int = doc("Rows per GradCache chunk (per rank).", 32)
    chunk_tokens: Optional[int] = doc(
        "Token budget per chunk instead of a row count: rows are sorted by length and packed so that "
        "rows x padded length <= chunk_tokens (a longer single row gets a chunk of its own).", None)


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
    precision: Literal["fp32", "bf16", "fp16"] = doc("Training precision (bf16/fp16 through DeepSpeed's mixed precision).", "fp32")
    device: Literal["auto", "cpu", "cuda"] = doc("Where to train; auto picks cuda when available.", "auto")
    gradient_checkpointing: bool = doc(
        "Recompute each layer's activations in backward. Redundant with GradCache (whose memory is already "
        "one chunk's activations); useful only to fit larger chunks, at ~30% more compute.", False)
    log_every: int = doc("Write a diagnostics row every this many steps.", 10, resume_safe=True)
    save_every: Optional[int] = doc(
        "Write a checkpoint (weights, optimizer, scheduler, RNG states, step) every this many steps; null "
        "writes none. A run killed after a checkpoint resumes from it exactly.", None, resume_safe=True)
    keep_checkpoints: int = doc("How many of the newest checkpoints to keep.", 2, resume_safe=True)


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
    baseline: bool = doc("Also evaluate the model before training and record it as a baseline run.", False,
                         resume_safe=True)


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
    eval: EvalSpec = doc("Evaluation after training.", None)
    registry: RegistrySpec = doc("Where runs are recorded.", None)

    def __post_init__(self) -> None:
        # Sub-sections with only defaulted keys may be omitted; fill them here so readers never see None.
        for name, cls in (("loss", LossSpec), ("cache", CacheSpec), ("train", TrainSpec),
                          ("deepspeed", DeepSpeedSpec), ("launch", LaunchSpec), ("eval", EvalSpec),
                          ("registry", RegistrySpec)):
            if getattr(self, name) is None:
                setattr(self, name, cls())
