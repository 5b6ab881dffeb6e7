"""One process of tests/test_distributed.py::test_bf16_gradients_accumulate_in_float32_under_deepspeed.

Runs one GradCache step (one backward per row) with the real DeepSpeed engine at train.precision=bf16,
captures the gradients the optimizer is handed, and compares them with the same step on the plain module
(no DeepSpeed, float32 .grad accumulation, the same bf16 autocast). Writes the relative difference and
the dtype of the engine's weights as JSON.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from koe5.data.batches import rank_slice
from koe5.data.dataset import load_training_data
from koe5.model import resolve_model_path
from koe5.spec import load_frozen
from koe5.train.step import train_step
from koe5.train.trainer import build_engine, build_model, init_distributed, step_config


class PlainEngine:
    def __init__(self, model):
        self.model = model

    def __call__(self, **batch):
        return self.model(**batch)

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass


def main(spec_path: str, out_path: str) -> None:
    spec = load_frozen(spec_path).spec
    model_path = resolve_model_path(spec.model.name_or_path)
    rank, _, world = init_distributed("cpu")
    assert world == 1
    data = load_training_data(spec)
    engine, _, _, _ = build_engine(spec, model_path, world, 1)

    handed = []  # what the torch optimizer sees: per-parameter grads (ZeRO-0) or flat partitions (ZeRO-1/2)
    engine.basic_optimizer.register_step_pre_hook(
        lambda opt, *_: handed.extend(p.grad.detach().float().clone().flatten()
                                      for g in opt.param_groups for p in g["params"] if p.grad is not None))
    queries, documents, doc_ids, _ = data.collate(rank_slice(data.global_batch(0), rank, world), torch.device("cpu"))
    cfg = step_config(spec)
    train_step(engine, queries, documents, doc_ids, cfg, torch.device("cpu"))

    reference, _, _ = build_model(spec, model_path)
    train_step(PlainEngine(reference), queries, documents, doc_ids, cfg, torch.device("cpu"))
    want = torch.cat([p.grad.flatten() for p in reference.parameters() if p.grad is not None])
    got = torch.cat(handed)[:want.numel()]  # ZeRO pads its flat partition at the end
    with open(out_path, "w") as f:
        json.dump({"rel_diff": float((got - want).abs().max() / want.abs().max()),
                   "weights_dtype": str(next(engine.module.parameters()).dtype),
                   "backward_calls": len(queries["input_ids"]) + len(documents["input_ids"])}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(*args)
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter teardown, as koe5.train does (see koe5/train/__main__.py)
