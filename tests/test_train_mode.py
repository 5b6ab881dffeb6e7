"""The model trains in training mode: dropout is active, GradCache's replay reproduces its masks, and
gradient checkpointing really recomputes with less activation memory.

`from_pretrained` returns a module in eval mode; before `build_model` called `.train()`, all of these
were silently off (dropout 0.3 gave identical forwards, and checkpointing checkpointed nothing)."""

import torch

from koe5.spec import expand
from koe5.train.gradcache import embed_without_grad, replay, row_chunks
from koe5.train.trainer import build_model


def spec_for(tmp_path, *overrides):
    data = tmp_path / "train.jsonl"
    data.write_text('{"query": "q", "document": "d"}\n', encoding="utf-8")
    (tmp_path / "spec.yaml").write_text(f"""
name: train-mode
model: {{name_or_path: "builtin:tiny-ko-bert", query_max_len: 16, passage_max_len: 32}}
data: {{sources: [{{path: {data}}}]}}
train: {{batch_size: 8, max_steps: 1, device: cpu}}
cache: {{chunk_size: 4}}
""", encoding="utf-8")
    return expand(tmp_path / "spec.yaml", list(overrides))[0].spec


def batch(rows=6, width=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, width + 1, (rows,), generator=gen)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return {"input_ids": torch.randint(5, 200, (rows, width), generator=gen) * mask, "attention_mask": mask}


def test_training_forwards_differ_when_dropout_is_on(tmp_path):
    """Catches a model left in eval mode: two forwards of the same batch are then identical."""
    from koe5.model import resolve_model_path

    model, _, _ = build_model(spec_for(tmp_path, "model.dropout=0.3"), resolve_model_path("builtin:tiny-ko-bert"))
    assert model.training and all(m.training for m in model.modules())
    b = batch()
    assert not torch.equal(model(**b), model(**b))
    model.eval()  # and the masks are what made them differ
    assert torch.equal(model(**b), model(**b))


def test_replay_of_the_built_model_reproduces_the_no_grad_pass(tmp_path):
    """Catches a replay that draws new dropout masks (RNG state not restored per chunk): its embeddings
    then differ from the cached ones and the cached gradient is applied to the wrong function."""
    from koe5.model import resolve_model_path

    model, _, _ = build_model(spec_for(tmp_path, "model.dropout=0.3"), resolve_model_path("builtin:tiny-ko-bert"))
    b, chunks = batch(rows=7), row_chunks(7, 3)
    first, states = embed_without_grad(model, b, chunks, torch.device("cpu"))
    replayed = []

    def recording(**chunk):
        out = model(**chunk)
        replayed.append(out.detach())
        return out

    replay(recording, b, chunks, states, torch.ones_like(first), lambda s: s.backward())
    assert torch.equal(torch.cat(replayed), first)


def _replay_cost(model, b):
    """(layer forwards, bytes of tensors saved for backward) of one forward + backward with grad."""
    calls = []  # an inner module: transformers 5 checkpoints the layer's forward, inside its hooks
    hook = model.backbone.encoder.layer[0].intermediate.register_forward_hook(lambda *_: calls.append(1))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**b)
    out.sum().backward()
    hook.remove()
    return len(calls), sum(saved)


def test_gradient_checkpointing_recomputes_with_less_activation_memory(tmp_path):
    """Catches checkpointing that is configured but inactive (eval mode): the layer then runs once per
    forward + backward instead of twice, and saves as much for backward as without checkpointing."""
    from koe5.model import resolve_model_path

    path = resolve_model_path("builtin:tiny-ko-bert")
    plain, _, _ = build_model(spec_for(tmp_path, "model.dropout=0.0"), path)
    ckpt, _, _ = build_model(spec_for(tmp_path, "model.dropout=0.0", "train.gradient_checkpointing=true"), path)
    b = batch(rows=8, width=32)
    plain_calls, plain_bytes = _replay_cost(plain, b)
    ckpt_calls, ckpt_bytes = _replay_cost(ckpt, b)
    assert (plain_calls, ckpt_calls) == (1, 2)
    assert ckpt_bytes < 0.7 * plain_bytes
    grads = [{n: p.grad for n, p in m.named_parameters()} for m in (plain, ckpt)]
    for name in grads[0]:  # and it changes nothing but the cost
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)
