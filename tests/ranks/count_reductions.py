"""One rank of tests/test_distributed.py::test_gradients_are_reduced_once_per_step.

Trains 2 steps with the real engine and train_step, counting the gradient collectives that run inside
each replayed chunk's backward and inside the optimizer step; writes the counts as JSON.
"""

import json
import os
import sys
from collections import Counter

import torch
import torch.distributed as dist

from koe5.data.batches import rank_slice
from koe5.data.dataset import load_training_data
from koe5.model import resolve_model_path
from koe5.spec import load_frozen
from koe5.train.step import train_step
from koe5.train.trainer import build_engine, init_distributed, step_config

COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter", "all_reduce_coalesced", "reduce")


def main(spec_path: str, out_path: str) -> None:
    spec = load_frozen(spec_path).spec
    model_path = resolve_model_path(spec.model.name_or_path)
    rank, _, world = init_distributed("cpu")
    data = load_training_data(spec)
    engine, _, _, _ = build_engine(spec, model_path, world, 2)

    phase = {"now": "other"}
    counts: Counter = Counter()
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def counting(*args, _original=original, **kwargs):
            counts[phase["now"]] += 1
            return _original(*args, **kwargs)
        setattr(dist, name, counting)

    def in_phase(name, fn):
        def wrapped(*args, **kwargs):
            previous, phase["now"] = phase["now"], name
            try:
                return fn(*args, **kwargs)
            finally:
                phase["now"] = previous
        return wrapped

    backwards = Counter()
    real_backward = engine.backward
    engine.backward = in_phase("backward", lambda *a, **k: (backwards.update(["n"]), real_backward(*a, **k))[1])
    engine.step = in_phase("step", engine.step)
    for step in range(2):
        rows = rank_slice(data.global_batch(step), rank, world)
        queries, documents, doc_ids, _ = data.collate(rows, torch.device("cpu"))
        train_step(engine, queries, documents, doc_ids, step_config(spec), torch.device("cpu"))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"backward_calls": backwards["n"], **counts}, f)
    # Leave the group cleanly: exiting with ZeRO-2's communication state alive can abort the process.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(*args)
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter teardown, as koe5.train does (see koe5/train/__main__.py)
