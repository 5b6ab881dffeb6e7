"""By hand (docs/benchmarks.md, issue 17 lever 2): the tests' tiny BERT compiled with inductor, dropout 0.3;
GradCache's replay must draw the no-grad pass's masks. tests/test_compile.py checks the same with aot_eager,
since inductor's code generation takes minutes per graph on a small CPU.

    PYTHONPATH=. python benchmarks/check_compile_replay.py
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_gradcache import random_batch, tiny_model  # noqa: E402

from koe5.train.compile import compile_backbone  # noqa: E402
from koe5.train.gradcache import embed_without_grad, make_chunks, replay, row_chunks  # noqa: E402

gen = torch.Generator().manual_seed(11)
model = tiny_model(dropout=0.3).train()
counter = compile_backbone(model.backbone, "inductor")
batch = random_batch(10, 16, gen)
for name, chunks in [("rows3", row_chunks(10, 3)), ("tokens", make_chunks(batch, 1, 40))]:
    t = time.time()
    torch.manual_seed(123)
    first, states = embed_without_grad(model, batch, chunks, torch.device("cpu"))
    t1 = time.time()
    replayed = {}

    def recording(**chunk):
        out = model(**chunk)
        replayed[len(replayed)] = out.detach()
        return out

    replay(recording, batch, chunks, states, torch.ones_like(first), lambda s: s.backward())
    t2 = time.time()
    got = torch.empty_like(first)
    for i, rows in enumerate(chunks):
        got[rows] = replayed[i]
    print(name, "no-grad pass", round(t1 - t, 1), "s, replay", round(t2 - t1, 1), "s, graphs compiled so far",
          counter.graphs, "replay == no-grad pass:", torch.equal(got, first),
          "max diff", float((got - first).abs().max()))
    torch.manual_seed(5)
    print("  masks are random (a fresh forward differs):", not torch.equal(model(**batch), first))
