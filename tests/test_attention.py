"""model.attention: varlen against the padded forward, the reference, in float32 on the CPU.

On the CPU the packed path calls its reference attention (scaled_dot_product_attention with a block-diagonal
mask over the packed tokens): these tests prove the packing, the positions, the segment pooling and the
gradients through them; torch's varlen_attn kernel itself is GPU-only and runs only there.

Tolerances (float32): embeddings 1e-6 (the two paths sum the same terms in another order: ~1e-7 seen);
gradients 1e-5; weights after 3 training steps 1e-5 (tests/test_distributed.py's rule).
"""

from __future__ import annotations

import pytest
import torch
from transformers import XLMRobertaConfig, XLMRobertaModel

from koe5.attention import block_diagonal_mask, pack
from koe5.model import EmbeddingModel, load_backbone
from koe5.train.step import StepConfig, train_step
from test_distributed import assert_same_weights, assert_trained, trained_weights
from test_gradcache import PlainEngine, grads_of, reference_loss


def tiny_ko_bert(seed: int = 0):
    backbone, _ = load_backbone("builtin:tiny-ko-bert", dropout=0.0)
    return backbone, backbone.config.pad_token_id


def random_xlmr(seed: int = 0):
    """An XLM-R-like encoder, random weights: positions start at padding_idx + 1, as mE5's do."""
    torch.manual_seed(seed)
    cfg = XLMRobertaConfig(vocab_size=150, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=96, max_position_embeddings=66, pad_token_id=1,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return XLMRobertaModel(cfg, add_pooling_layer=False), cfg.pad_token_id


BACKBONES = {"tiny-ko-bert": tiny_ko_bert, "xlm-r": random_xlmr}


def padded_batch(lengths: list[int], width: int, vocab: int, pad_id: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, vocab, (len(lengths), width), generator=gen)
    return {"input_ids": ids * mask + pad_id * (1 - mask), "attention_mask": mask}


def pair(name: str, pooling: str) -> tuple[EmbeddingModel, EmbeddingModel, int]:
    """Two copies of one backbone, padded and varlen, in training mode (dropout 0)."""
    (a, pad_id), (b, _) = BACKBONES[name](), BACKBONES[name]()
    b.load_state_dict(a.state_dict())
    return (EmbeddingModel(a, pooling, True).train(), EmbeddingModel(b, pooling, True, attention="varlen").train(),
            pad_id)


def word_embedding_grads(model: EmbeddingModel) -> list:
    """A hook keeping the gradient w.r.t. the word embeddings' output: the gradient w.r.t. the inputs."""
    kept = []

    def keep(module, args, out):
        out.register_hook(kept.append)  # returns a handle; the hook itself must return None

    model.backbone.get_input_embeddings().register_forward_hook(keep)
    return kept


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_unpadded_forward_equals_padded_embeddings_and_gradients(name, pooling):
    padded, varlen, pad_id = pair(name, pooling)
    vocab = padded.backbone.config.vocab_size
    # uneven lengths, one row filling the width, one of a single token
    batch = padded_batch([5, 24, 1, 13, 9], 24, vocab, pad_id, seed=3)
    inputs = {m: word_embedding_grads(m) for m in (padded, varlen)}
    weights = torch.randn(5, padded.backbone.config.hidden_size, generator=torch.Generator().manual_seed(4))

    out = {}
    for m in (padded, varlen):
        emb = m(**batch)
        (emb * weights).sum().backward()  # a loss that weighs every row and dimension differently
        out[m] = emb.detach()
    torch.testing.assert_close(out[varlen], out[padded], rtol=0, atol=1e-6)

    want, got = grads_of(padded), grads_of(varlen)
    assert want.keys() == got.keys() and len(want) > 10
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)

    # inputs: the packed gradient is the padded one at the real tokens; pad tokens get none
    [g_padded], [g_packed] = inputs[padded], inputs[varlen]
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(g_packed[0], g_padded[mask], rtol=1e-5, atol=1e-6)
    assert g_padded[~mask].abs().max() == 0


def test_packing_gives_offsets_positions_and_tokens_of_each_row():
    backbone, pad_id = random_xlmr()
    batch = padded_batch([3, 1, 4], 8, 150, pad_id, seed=0)
    packed = pack(backbone.embeddings, **batch)
    assert packed.cu_seqlens.tolist() == [0, 3, 4, 8] and packed.cu_seqlens.dtype == torch.int32
    assert packed.max_len == 4
    assert packed.segment.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert packed.input_ids[0].tolist() == batch["input_ids"][batch["attention_mask"].bool()].tolist()
    # XLM-R numbers each row from padding_idx + 1, as its padded forward does
    assert packed.position_ids[0].tolist() == [2, 3, 4, 2, 2, 3, 4, 5]
    mask = block_diagonal_mask(packed.cu_seqlens, 8)[0, 0]
    assert mask[0, 2] and not mask[2, 3] and mask[4, 7] and not mask[3, 4]


def test_varlen_turns_attention_dropout_off_and_reports_it():
    backbone, _ = load_backbone("builtin:tiny-ko-bert", dropout=0.1)
    model = EmbeddingModel(backbone, "mean", True, attention="varlen")
    assert model.replaced_attention_dropout == pytest.approx(0.1)
    attention_dropouts = [m.dropout.p for m in backbone.modules() if hasattr(m, "attention_head_size")]
    assert attention_dropouts and set(attention_dropouts) == {0.0}
    hidden = [m.p for n, m in backbone.named_modules() if isinstance(m, torch.nn.Dropout) and "output" in n]
    assert hidden and set(hidden) == {0.1}  # hidden dropout stays
    assert backbone.config.attention_probs_dropout_prob == pytest.approx(0.1)  # the export keeps the config


def test_varlen_refuses_an_architecture_it_cannot_pack(tmp_path):
    """In the model (a ValueError) and, before a run is recorded, in koe5-run's check_model: one line naming
    model.attention, from the model's config."""
    import shutil

    from transformers import GPT2Config, GPT2Model

    from koe5.demo_model import build_demo_model
    from koe5.orchestrate.checks import ModelError, check_model
    from koe5.spec.schema import DataSpec, ModelSpec, SourceSpec, Spec

    with pytest.raises(ValueError, match="model.attention: varlen supports bert"):
        EmbeddingModel(GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2)), "mean", True, attention="varlen")

    gpt2 = tmp_path / "gpt2"
    shutil.copytree(build_demo_model(), gpt2)  # the demo's tokenizer files, a GPT-2 config
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(gpt2)

    def spec_with(path, attention):
        return Spec(name="m", model=ModelSpec(name_or_path=str(path), attention=attention),
                    data=DataSpec(sources=[SourceSpec(path="x")]))

    check_model(spec_with(gpt2, "padded"))
    check_model(spec_with("builtin:tiny-ko-bert", "varlen"))
    with pytest.raises(ModelError, match=r"^model.attention: varlen supports bert, .* is 'gpt2': use model"):
        check_model(spec_with(gpt2, "varlen"))


@pytest.mark.parametrize("chunking", [dict(chunk_size=2), dict(chunk_tokens=60)])
def test_gradcache_with_varlen_matches_full_batch_padded_backprop(chunking):
    """GradCache replaying packed chunks gives the gradients of plain full-batch backprop through the padded
    model (tests/test_gradcache.py's reference)."""
    padded, varlen, pad_id = pair("tiny-ko-bert", "mean")
    vocab = padded.backbone.config.vocab_size
    b = 4
    queries = padded_batch([3, 7, 12, 5], 16, vocab, pad_id, seed=1)
    docs = padded_batch([20, 4, 9, 16, 11, 2, 24, 8], 24, vocab, pad_id, seed=2)
    doc_ids = torch.arange(2 * b)
    loss = reference_loss(padded(**queries), padded(**docs), doc_ids, 0.05, False, True)
    loss.backward()
    cfg = StepConfig(loss_name="infonce", temperature=0.05, mask_duplicates=True, cache=True, **chunking)
    result = train_step(PlainEngine(varlen), queries, docs, doc_ids, cfg, torch.device("cpu"))
    assert abs(result.loss - loss.item()) < 1e-5
    want, got = grads_of(padded), grads_of(varlen)
    assert want.keys() == got.keys() and len(want) > 10
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)


def test_three_gradcache_steps_with_varlen_give_the_padded_weights():
    """The trainer end to end (tests/test_distributed.py's 3-step run, fp32, dropout 0, GradCache chunks of
    3): the exported weights of model.attention varlen and padded agree to 1e-5."""
    reference = trained_weights("cache.chunk_size=3")
    assert_trained(reference)
    assert_same_weights(trained_weights("cache.chunk_size=3", "model.attention=varlen"), reference)


def test_every_issue_17_lever_together_gives_the_plain_weights():
    """Unpadded attention, the compiled backbone (aot_eager, tests/conftest.py), the prefetch thread and token
    chunks, all in one run: the weights of the plain padded run with row chunks, to 1e-5. Each lever is proven
    alone elsewhere; this is the combination levers.sh's `every` row times on a GPU."""
    reference = trained_weights("cache.chunk_size=3")
    assert_trained(reference)
    assert_same_weights(trained_weights("cache.chunk_size=3", "cache.chunk_tokens=96", "model.attention=varlen",
                                        "train.compile=true", "data.prefetch=2"), reference)
