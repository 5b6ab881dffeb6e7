"""The training data a run draws from: every source read and validated, and the global batch of any
step computed from (seed, step) alone, so every rank agrees and a resume needs only the step.

    data = load_training_data(spec)
    data.steps_per_epoch            # full global batches per epoch (the last partial batch is dropped)
    batch = data.global_batch(step) # list[Example], length train.batch_size
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from koe5.data.batches import batches_per_epoch, global_batch, pick_negatives
from koe5.data.triples import DataError, Triple, read_triples
from koe5.spec.schema import Spec


@dataclass(frozen=True)
class Example:
    """One query with its positive and the hard negatives drawn for this epoch."""
    query: str
    positive: str
    negatives: tuple[str, ...]
    source: str


class TrainingData:
    def __init__(self, spec: Spec, triples: list[Triple], sources: list[str]):
        self.spec = spec
        self.triples = triples
        self.sources = sources
        self.steps_per_epoch = batches_per_epoch(len(triples), spec.train.batch_size)
        if self.steps_per_epoch == 0:
            raise DataError(f"train.batch_size={spec.train.batch_size} is larger than the "
                             f"{len(triples)} training triples")

    def total_steps(self) -> int:
        t = self.spec.train
        return t.max_steps if t.max_steps else max(1, int(self.steps_per_epoch * t.epochs))

    def global_batch(self, step: int) -> list[Example]:
        epoch, index = divmod(step, self.steps_per_epoch)
        n = self.spec.data.hard_negatives
        ids = global_batch(len(self.triples), self.spec.train.batch_size, self.spec.seed, epoch, index)
        return [Example(self.triples[i].query, self.triples[i].document,
                        tuple(pick_negatives(self.triples[i].hard_negatives, n, epoch)) if n else (),
                        self.sources[i]) for i in ids]

    def source_weights(self) -> dict[str, float]:
        return {source_name(s): s.weight for s in self.spec.data.sources}


def source_name(source) -> str:
    return source.name or Path(source.path).name


def load_training_data(spec: Spec) -> TrainingData:
    """Read every source; a bad line raises DataError naming file:line and the field."""
    triples, sources = [], []
    for src in spec.data.sources:
        rows = read_triples(src.path, spec.data.hard_negatives)
        triples += rows
        sources += [source_name(src)] * len(rows)
    return TrainingData(spec, triples, sources)
