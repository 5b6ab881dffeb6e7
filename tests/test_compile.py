"""train.compile (issue 17, lever 2): the compiled backbone trains to the uncompiled weights with dropout on,
GradCache's replay of a compiled model draws the no-grad pass's dropout masks, the compiles are counted and
logged, and ZeRO-3 is refused with a clear error.

The tests compile with the `aot_eager` backend (KOE5_COMPILE_BACKEND): the same graph capture, functionalized
autograd graphs and dropout lowering as inductor, without its C++ code generation, which takes minutes per
graph on this 2-core CPU. Inductor itself was checked by hand on the tiny model (docs/benchmarks.md)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from koe5.spec import SpecError, expand
from koe5.train.compile import BACKEND_ENV, compile_backbone
from koe5.train.gradcache import embed_without_grad, make_chunks, replay
from test_gradcache import random_batch, tiny_model
from test_prefetch import train_run, write_spec


def test_replay_of_a_compiled_model_draws_the_no_grad_masks():
    """Chunks of several shapes through a compiled backbone with dropout 0.3: the replay with grad (another
    compiled graph) reproduces the no-grad pass bit for bit, and the compiles level off instead of one per
    chunk shape."""
    gen = torch.Generator().manual_seed(11)
    model = tiny_model(dropout=0.3).train()
    counter = compile_backbone(model.backbone, "aot_eager")
    batch = random_batch(24, 40, gen)
    chunks = make_chunks(batch, 1, 96)  # sorted by length, packed: rows and width change between chunks
    shapes = {(len(c), max(int(batch["attention_mask"][i].sum()) for i in c.tolist())) for c in chunks}
    assert len(chunks) >= 5 and len(shapes) >= 5
    torch.manual_seed(123)
    first, states = embed_without_grad(model, batch, chunks, torch.device("cpu"))
    assert not torch.equal(model(**batch), first)  # the masks really are random

    replayed = torch.empty_like(first)
    it = iter(chunks)

    def recording(**chunk):
        out = model(**chunk)
        replayed[next(it)] = out.detach()
        return out

    replay(recording, batch, chunks, states, torch.ones_like(first), lambda s: s.backward())
    assert torch.equal(replayed, first)
    assert 0 < counter.graphs <= 6, counter.graphs  # no-grad and grad graphs, static then dynamic


def test_compiled_training_ends_with_the_uncompiled_weights(tmp_path, monkeypatch):
    """3 steps of the real trainer, dropout 0.1, GradCache token chunks, compiled and not: weights within 1e-5;
    the training log reports the compiles."""
    monkeypatch.setenv(BACKEND_ENV, "aot_eager")
    steps = ("train.max_steps=3", "train.save_every=null")
    plain, _ = train_run(tmp_path, "plain", *steps)
    compiled, _ = train_run(tmp_path, "compiled", *steps, "train.compile=true")
    want = load_file(plain / "model" / "model.safetensors")
    got = load_file(compiled / "model" / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
    rows = [json.loads(line) for line in (compiled / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["compiles"] > 0 for r in rows)
    assert "compiles" not in (plain / "train_log.jsonl").read_text()


def test_compile_with_zero_3_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match=r"train\.compile.*zero_stage 3"):
        expand(write_spec(tmp_path), ["train.compile=true", "deepspeed.zero_stage=3"])
    expand(write_spec(tmp_path), ["train.compile=true", "deepspeed.zero_stage=2"])  # stages 0-2 are fine
