"""The training data a run draws from: every source read and validated, and the global batch of any
step computed from (seed, step) alone, so every rank agrees and a resume needs only the step.

    data = load_training_data(spec)
    data.steps_per_epoch            # full global batches per epoch (the last partial batch is dropped)
    batch = data.global_batch(step) # list[Example], length train.batch_size

Duplicate positives in one batch are not resampled: a batch may hold two examples whose positives have
the same normalized text (koe5.data.triples.text_key). The trainer masks them instead (loss.mask_duplicates,
koe5/train/loss.py): a candidate with the same text key as a row's positive is never scored as that row's
negative. Masking keeps global_batch a cheap pure function of the step and every example drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


def source_probabilities(sizes: list[int], weights: list[float], mixing: str, temperature: float) -> np.ndarray:
    """p(source) for one drawn example under data.mixing."""
    sizes_a, weights_a = np.asarray(sizes, dtype=float), np.asarray(weights, dtype=float)
    if mixing == "weighted":
        mass = weights_a
    elif mixing == "temperature":
        mass = (sizes_a * weights_a) ** (1.0 / temperature)
    else:
        mass = sizes_a * weights_a
    return mass / mass.sum()


class TrainingData:
    def __init__(self, spec: Spec, triples: list[Triple], sources: list[str], skipped: dict[str, int]):
        self.spec = spec
        self.skipped = skipped  # bad lines left out per file (data.on_error: skip)
        self.triples = triples
        self.sources = sources
        names = [source_name(s) for s in spec.data.sources]
        self.sizes = [sources.count(n) for n in names]
        self.offsets = np.cumsum([0] + self.sizes[:-1])
        weights = [s.weight for s in spec.data.sources]
        # One shuffled pass per epoch (no example twice before all were seen) when the mix is the natural
        # one; any other mix samples sources, and examples within them, independently at every draw.
        self.shuffled_passes = spec.data.mixing == "proportional" and all(w == 1 for w in weights)
        self.probabilities = source_probabilities(self.sizes, weights, spec.data.mixing,
                                                  spec.data.mixing_temperature)
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
        b = self.spec.train.batch_size
        if self.shuffled_passes:
            ids = global_batch(len(self.triples), b, self.spec.seed, epoch, index)
        else:
            rng = np.random.default_rng([self.spec.seed, 1, step])
            source = rng.choice(len(self.sizes), size=b, p=self.probabilities)
            within = rng.random(b) * np.asarray(self.sizes)[source]
            ids = self.offsets[source] + within.astype(np.int64)
        return [Example(self.triples[i].query, self.triples[i].document,
                        tuple(pick_negatives(self.triples[i].hard_negatives, n, epoch)) if n else (),
                        self.sources[i]) for i in ids]

    def source_weights(self) -> dict[str, float]:
        return {source_name(s): s.weight for s in self.spec.data.sources}


def source_name(source) -> str:
    return source.name or Path(source.path).name


def load_training_data(spec: Spec) -> TrainingData:
    """Read every source; a bad line raises DataError naming file:line and the field (or, with
    data.on_error: skip, is left out and counted in `.skipped`)."""
    triples, sources = [], []
    skipped: dict[str, int] | None = {} if spec.data.on_error == "skip" else None
    for src in spec.data.sources:
        rows = read_triples(src.path, spec.data.hard_negatives, skipped)
        triples += rows
        sources += [source_name(src)] * len(rows)
    return TrainingData(spec, triples, sources, skipped or {})
