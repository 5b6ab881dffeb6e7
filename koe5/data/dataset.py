"""The training data a run draws from: every source tokenized once (koe5/data/tokens.py), and the global
batch of any step computed from (seed, step) alone, so every rank agrees and a resume needs only the step.

    data = load_training_data(spec, tokenizer)
    data.steps_per_epoch               # full global batches per epoch (the last partial batch is dropped)
    batch = data.global_batch(step)    # Batch: which row, positive and hard negatives each example uses
    queries, documents, doc_ids, n_tokens = data.collate(batch[a:b], device)
    batch.scores                       # the teacher's scores of each example's documents (NaN: none)

Duplicate positives in one batch are not resampled: a batch may hold two examples whose positives have
the same normalized text (koe5.data.triples.text_key). The trainer masks them instead (loss.mask_duplicates,
koe5/train/loss.py): a candidate with the same text key as a row's positive is never scored as that row's
negative. Masking keeps global_batch a cheap pure function of the step and every example drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from koe5.data.batches import batches_per_epoch
from koe5.data.errors import DataError
from koe5.data.tokens import TokenizedSource, open_tokenized, tokenizer_fingerprint
from koe5.inputs import pad_token_ids
from koe5.spec.schema import Spec


@dataclass(frozen=True, eq=False)
class Batch:
    """Examples as indices: for each, its source, its row there, and the documents (indices into that
    source's documents) it trains on this epoch."""
    source: np.ndarray     # (b,)
    row: np.ndarray        # (b,)
    positive: np.ndarray   # (b,)
    negatives: np.ndarray  # (b, data.hard_negatives)
    # (b, 1 + data.hard_negatives) float32: the teacher's score of the positive, then of each negative, for this
    # example's query (fields.scores); NaN where there is none (see `_examples`).
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.row)

    def __getitem__(self, part: slice) -> "Batch":
        return Batch(self.source[part], self.row[part], self.positive[part], self.negatives[part], self.scores[part])

    def ids(self) -> list[tuple[int, int]]:
        """(source, row) of each example, for comparing batches."""
        return list(zip(self.source.tolist(), self.row.tolist()))


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
    def __init__(self, spec: Spec, sources: list[TokenizedSource], pad_id: int):
        self.spec = spec
        self.sources = sources
        self.pad_id = pad_id
        self.names = [source_name(s) for s in spec.data.sources]
        self.skipped = {str(s.path): t.skipped for s, t in zip(spec.data.sources, sources) if t.skipped}
        self.sizes = [t.n_rows for t in sources]
        self.offsets = np.cumsum([0] + self.sizes[:-1])
        weights = [s.weight for s in spec.data.sources]
        b = spec.train.batch_size
        # One shuffled pass per epoch (no example twice before all were seen) when the mix is the natural
        # one; any other mix samples sources, and examples within them, independently at every draw.
        self.shuffled_passes = spec.data.mixing == "proportional" and all(w == 1 for w in weights)
        self.probabilities = source_probabilities(self.sizes, weights, spec.data.mixing,
                                                  spec.data.mixing_temperature)
        if spec.data.one_source_per_batch:
            small = [f"{n} ({size})" for n, size in zip(self.names, self.sizes) if size < b]
            if small:
                raise DataError(f"data.one_source_per_batch: sources smaller than train.batch_size={b} cannot fill "
                                f"a batch on their own: {', '.join(small)}")
            self.steps_per_epoch = sum(size // b for size in self.sizes)
            self._plan_single_source_batches()
        else:
            self.steps_per_epoch = batches_per_epoch(sum(self.sizes), b)
        if self.steps_per_epoch == 0:
            raise DataError(f"train.batch_size={b} is larger than the {sum(self.sizes)} training triples")

    def total_steps(self) -> int:
        t = self.spec.train
        return t.max_steps if t.max_steps else max(1, int(self.steps_per_epoch * t.epochs))

    def _plan_single_source_batches(self) -> None:
        """Which source each step draws from, and how many earlier steps drew from it: each source is
        then read in its own shuffled passes, every row once per pass."""
        steps = self.total_steps()
        rng = np.random.default_rng([self.spec.seed, 3])
        self._step_source = rng.choice(len(self.sizes), size=steps, p=self.probabilities)
        self._step_ordinal = np.zeros(steps, dtype=np.int64)
        for k in range(len(self.sizes)):
            where = np.flatnonzero(self._step_source == k)
            self._step_ordinal[where] = np.arange(len(where))

    def global_batch(self, step: int) -> Batch:
        epoch, index = divmod(step, self.steps_per_epoch)
        b, seed = self.spec.train.batch_size, self.spec.seed
        if self.spec.data.one_source_per_batch:
            k = int(self._step_source[step])
            per_pass = self.sizes[k] // b
            pass_, at = divmod(int(self._step_ordinal[step]), per_pass)
            rows = self._permutation((seed, 4, k, pass_), self.sizes[k])[at * b:(at + 1) * b]
            ids = self.offsets[k] + rows
        elif self.shuffled_passes:
            ids = self._permutation((seed, epoch), sum(self.sizes))[index * b:(index + 1) * b]
        else:
            rng = np.random.default_rng([seed, 1, step])
            source = rng.choice(len(self.sizes), size=b, p=self.probabilities)
            within = rng.random(b) * np.asarray(self.sizes)[source]
            ids = self.offsets[source] + within.astype(np.int64)
        return self._examples(np.asarray(ids, dtype=np.int64), epoch)

    def _permutation(self, seed: tuple, n: int) -> np.ndarray:
        """np.random.default_rng(seed).permutation(n), kept while consecutive steps read the same pass (a
        million-row permutation costs ~20 ms; a pass has thousands of steps)."""
        if getattr(self, "_last_permutation", (None,))[0] != seed:
            self._last_permutation = (seed, np.random.default_rng(list(seed)).permutation(n))
        return self._last_permutation[1]

    def _examples(self, ids: np.ndarray, epoch: int) -> Batch:
        n = self.spec.data.hard_negatives
        source = np.searchsorted(self.offsets, ids, side="right") - 1
        row = ids - self.offsets[source]
        positive = np.empty(len(ids), dtype=np.int64)
        negatives = np.empty((len(ids), n), dtype=np.int64)
        scores = np.full((len(ids), 1 + n), np.nan, dtype=np.float32)
        for k in np.unique(source):
            mine, t = source == k, self.sources[k]
            r = row[mine]
            start = t.rows_docs[r]
            n_pos = t.rows_npos[r].astype(np.int64)
            pick = 0
            if self.spec.data.positive == "sample":
                pick = (_mix64(self.spec.seed, epoch, ids[mine]) % n_pos.astype(np.uint64)).astype(np.int64)
            positive[mine] = start + pick
            if n:  # rotate through each row's negatives: epoch e takes the next n after epoch e-1's
                n_neg = t.rows_docs[r + 1] - start - n_pos
                turn = (epoch * n + np.arange(n)[None, :]) % np.maximum(n_neg, 1)[:, None]
                chosen = (start + n_pos)[:, None] + turn
                # A row with no negatives of its own (pair and QA sets: STS, paraphrases, MS MARCO) trains on
                # the positives of other rows of its source, drawn per (seed, epoch, example): random in-domain
                # negatives keep every row's layout the same, which cross-device gathering needs.
                none = n_neg == 0
                # The teacher scored each document for its own row's query: a negative keeps its score
                # (whichever n of the row's negatives this epoch takes), a borrowed positive has none.
                if none.any():
                    chosen[none] = self._random_positives(t, ids[mine][none], r[none], epoch, n)
                neg_scores = t.docs_score[chosen]
                neg_scores[none] = np.nan
                negatives[mine] = chosen
                scores[mine, 1:] = neg_scores
            scores[mine, 0] = t.docs_score[positive[mine]]
        return Batch(source, row, positive, negatives, scores)

    def _random_positives(self, t: TokenizedSource, ids: np.ndarray, rows: np.ndarray, epoch: int,
                          n: int) -> np.ndarray:
        """(len(rows), n) document indices: the first positive of n other rows of the same source, a pure
        function of (seed, epoch, example id), so every rank and a resumed run draw the same."""
        size = t.n_rows
        if size < 2:
            raise DataError(f"{t.meta['source']}: a source of one row has no other row to take negatives from")
        out = np.empty((len(rows), n), dtype=np.int64)
        for j in range(n):
            offset = _mix64(self.spec.seed + 7919 * (j + 1), epoch, ids) % np.uint64(size - 1)
            other = (rows + 1 + offset.astype(np.int64)) % size  # never the row itself
            out[:, j] = t.rows_docs[other]
        return out

    def collate(self, batch: Batch, device: torch.device):
        """Padded token ids of the batch's queries and documents, in the layout the loss expects (positives
        first, then each query's negatives in order), the documents' text keys and the real token count,
        on `device` (`collate_host`, then `to_device`)."""
        return to_device(self.collate_host(batch), device)

    def collate_host(self, batch: Batch, pin: bool = False):
        """`collate` on the host; `pin`: in page-locked memory, so the copy to the GPU can be asynchronous
        (koe5/data/prefetch.py builds batches this way in a background thread)."""
        refs = list(zip(batch.source.tolist(), batch.positive.tolist()))
        refs += [(k, j) for k, row in zip(batch.source.tolist(), batch.negatives.tolist()) for j in row]
        query_ids = [self.sources[k].query(r) for k, r in zip(batch.source.tolist(), batch.row.tolist())]
        doc_ids = [self.sources[k].doc(j) for k, j in refs]
        keys = torch.tensor([int(self.sources[k].docs_key[j]) for k, j in refs], dtype=torch.int64)
        n_tokens = sum(len(x) for x in query_ids) + sum(len(x) for x in doc_ids)
        m = self.spec.model
        queries = pad_token_ids(query_ids, self.pad_id, m.query_max_len)
        documents = pad_token_ids(doc_ids, self.pad_id, m.passage_max_len)
        if pin:
            queries, documents, keys = queries.pin_memory(), documents.pin_memory(), keys.pin_memory()
        return queries, documents, keys, n_tokens

    def tokens_per_example(self, batch: Batch) -> np.ndarray:
        """Real tokens each example trains on: its query, positive and hard negatives (after truncation)."""
        out = np.zeros(len(batch), dtype=np.int64)
        for k in np.unique(batch.source):
            mine, t = batch.source == k, self.sources[k]
            docs = np.concatenate([batch.positive[mine][:, None], batch.negatives[mine]], axis=1)
            out[mine] = (np.diff(t.queries_off)[batch.row[mine]]
                         + (t.docs_off[docs + 1] - t.docs_off[docs]).sum(axis=1))
        return out

    def source_weights(self) -> dict[str, float]:
        return {source_name(s): s.weight for s in self.spec.data.sources}


def to_device(collated: tuple, device: torch.device, non_blocking: bool = False) -> tuple:
    """A `collate_host` result on `device`. The queries' and documents' host lengths travel along
    (koe5.inputs.ModelInputs), so GradCache never reads a length back from the device."""
    queries, documents, keys, n_tokens = collated
    return (queries.to(device, non_blocking=non_blocking), documents.to(device, non_blocking=non_blocking),
            keys.to(device, non_blocking=non_blocking), n_tokens)


def _mix64(seed: int, epoch: int, ids: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of (seed, epoch, example id) (splitmix64's finalizer), for choices that must
    be the same on every rank and after a resume without drawing a random number per example."""
    with np.errstate(over="ignore"):
        x = ids.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) \
            + np.uint64(epoch) * np.uint64(0xD1B54A32D192ED03)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def source_name(source) -> str:
    return source.name or Path(source.path).name


def load_tokenizer(spec: Spec):
    from transformers import AutoTokenizer

    from koe5.model import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(spec.model.name_or_path))


def load_training_data(spec: Spec, tokenizer=None) -> TrainingData:
    """Every source, tokenized (from the cache when this data was tokenized before). A bad record raises
    DataError naming file:line and the field (or, with data.on_error: skip, is left out and counted in
    `.skipped`)."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    fp = tokenizer_fingerprint(tokenizer)
    sources = [open_tokenized(src, spec, tokenizer, fp) for src in spec.data.sources]
    return TrainingData(spec, sources, tokenizer.pad_token_id)
