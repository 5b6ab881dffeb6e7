"""loss.guide_model and loss.matryoshka_dims against sentence-transformers' own losses, and their checks.

The loss and every gradient of one koe5 GradCache step equal sentence-transformers' on the same batch,
the same backbone weights (and the same guide), where the definitions match:
- guide: infonce with one hard negative per query against GISTEmbedLoss with contrast_anchors=False and
  contrast_positives=False (koe5 never contrasts queries with queries or positives with positives), cosine
  scores, the same temperature;
- matryoshka: infonce against MatryoshkaLoss around MultipleNegativesRankingLoss (scale = 1 / temperature).
The exactness of chunked, ZeRO and two-rank training is tested in test_gradcache.py and test_distributed.py.
"""

import json
from pathlib import Path

import pytest
import torch

from koe5.model import EmbeddingModel, resolve_model_path
from koe5.train.loss import GUIDE_MASKS, GuideConfig
from koe5.train.step import StepConfig, train_step
from test_gradcache import PlainEngine

SAMPLE = Path(__file__).resolve().parents[1] / "koe5" / "assets" / "ko_sample" / "train.jsonl"


@pytest.fixture(scope="module")
def other_guide(tmp_path_factory) -> str:
    """A second tiny model with the demo model's tokenizer and different weights (the demo model plus noise),
    so the guide's opinion is not the model's own."""
    from transformers import AutoModel, AutoTokenizer

    base = resolve_model_path("builtin:tiny-ko-bert")
    out = tmp_path_factory.mktemp("guide")
    model = AutoModel.from_pretrained(base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return str(out)


def st_model(path: str):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    word = Transformer(path, max_seq_length=64)
    model = SentenceTransformer(modules=[word, Pooling(word.get_embedding_dimension(), "mean")],
                                device="cpu")
    return model.eval()  # no dropout, so both losses see the same embeddings


def sample_batch(model, b: int) -> list[dict]:
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:b]]
    return [model.tokenize([prefix + r[key] for r in rows])
            for prefix, key in (("query: ", "query"), ("passage: ", "document"), ("passage: ", "hard_negative"))]


def koe5_inputs(anchors: dict, positives: dict, negatives: dict) -> tuple[dict, dict]:
    """The same token ids in koe5's layout: queries; documents = the positives, then one negative each."""
    keep = ("input_ids", "attention_mask")
    width = max(positives["input_ids"].shape[1], negatives["input_ids"].shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731  (0 = [PAD], masked)
    return {k: anchors[k] for k in keep}, {k: torch.cat([pad(positives[k]), pad(negatives[k])]) for k in keep}


@pytest.mark.parametrize("guide_kind", ["same", "other"])
@pytest.mark.parametrize("strategy,margin", [("absolute", 0.0), ("absolute", 0.02), ("relative", 0.02)])
def test_guided_loss_equals_sentence_transformers_gist(guide_kind, strategy, margin, other_guide):
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss, MultipleNegativesRankingLoss

    base = resolve_model_path("builtin:tiny-ko-bert")
    model, guide = st_model(base), st_model(base if guide_kind == "same" else other_guide)
    anchors, positives, negatives = sample_batch(model, 8)
    tau = 0.05

    gist = GISTEmbedLoss(model, guide, temperature=tau, margin_strategy=strategy, margin=margin,
                         contrast_anchors=False, contrast_positives=False)
    want_loss = gist([anchors, positives, negatives], None)
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    unguided = MultipleNegativesRankingLoss(model, scale=1 / tau)([anchors, positives, negatives], None).item()

    # koe5's model and guide over the very same backbones
    koe5_model = EmbeddingModel(model[0].auto_model, "mean", True)
    koe5_guide = EmbeddingModel(guide[0].auto_model, "mean", True).eval()
    queries, docs = koe5_inputs(anchors, positives, negatives)
    cfg = StepConfig(loss_name="infonce", temperature=tau, mask_duplicates=True, cache=True, chunk_size=3,
                     guide=GuideConfig(margin=margin, margin_strategy=strategy, mask=GUIDE_MASKS))
    result = train_step(PlainEngine(koe5_model), queries, docs, torch.arange(16), cfg, torch.device("cpu"),
                        guide_model=koe5_guide)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    assert 0 < result.guide_masked_frac < 1  # the guide masked some candidates, not all
    assert abs(unguided - want_loss.item()) > 1e-3  # and that changed the loss
    assert result.loss == pytest.approx(want_loss.item(), rel=1e-5)
    assert want.keys() == got.keys() and len(want) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert all(p.grad is None for p in guide.parameters())


@pytest.mark.parametrize("dims,weights", [((128, 64, 16), None), ((32, 128), (0.5, 2.0))])
def test_matryoshka_loss_equals_sentence_transformers(dims, weights):
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    from koe5.train.loss import MatryoshkaConfig

    model = st_model(resolve_model_path("builtin:tiny-ko-bert"))
    anchors, positives, negatives = sample_batch(model, 8)
    tau = 0.05
    inner = MultipleNegativesRankingLoss(model, scale=1 / tau)
    want_loss = MatryoshkaLoss(model, inner, list(dims), matryoshka_weights=weights)([anchors, positives, negatives],
                                                                                      None)
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    full_only = inner([anchors, positives, negatives], None).item()

    queries, docs = koe5_inputs(anchors, positives, negatives)
    cfg = StepConfig(loss_name="infonce", temperature=tau, cache=True, chunk_size=3,
                     matryoshka=MatryoshkaConfig(dims, weights or (1.0,) * len(dims)))
    result = train_step(PlainEngine(EmbeddingModel(model[0].auto_model, "mean", True)), queries, docs,
                        torch.arange(16), cfg, torch.device("cpu"))
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    assert abs(full_only - want_loss.item()) > 1e-2  # the truncated widths change the loss
    assert result.loss == pytest.approx(want_loss.item(), rel=1e-5)
    assert want.keys() == got.keys() and len(want) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_a_matryoshka_width_beyond_the_model_is_refused_from_its_config():
    from koe5.orchestrate.checks import ModelError, check_model
    from koe5.spec.schema import DataSpec, LossSpec, ModelSpec, SourceSpec, Spec

    def spec_with(dims):
        return Spec(name="m", model=ModelSpec(name_or_path="builtin:tiny-ko-bert"),
                    data=DataSpec(sources=[SourceSpec(path="x")]), loss=LossSpec(matryoshka_dims=dims))

    check_model(spec_with([128, 64]))  # the demo model is 128 wide
    with pytest.raises(ModelError, match=r"^loss.matryoshka_dims: \[256\] wider than the embeddings .* \(128 "):
        check_model(spec_with([256, 64]))


def test_a_guide_with_another_tokenizer_is_refused_before_its_weights_load(tmp_path, other_guide):
    """The guide reads the model's token ids, so a different vocabulary (or normalization) is a one-line
    ModelError naming loss.guide_model, from the tokenizer files alone."""
    from transformers import AutoTokenizer

    from koe5.orchestrate.checks import ModelError, check_model
    from koe5.spec.schema import DataSpec, LossSpec, ModelSpec, SourceSpec, Spec

    def spec_with(guide: str) -> Spec:
        return Spec(name="g", model=ModelSpec(name_or_path="builtin:tiny-ko-bert"),
                    data=DataSpec(sources=[SourceSpec(path="x")]), loss=LossSpec(guide_model=guide))

    check_model(spec_with(other_guide))  # the same tokenizer: accepted
    check_model(spec_with("builtin:tiny-ko-bert"))

    tokenizer = AutoTokenizer.from_pretrained(other_guide)
    tokenizer.add_tokens(["새단어"])  # one more word in the vocabulary
    (tmp_path / "vocab").mkdir()
    tokenizer.save_pretrained(tmp_path / "vocab")
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "vocab" / f).write_bytes((Path(other_guide) / f).read_bytes())
    with pytest.raises(ModelError, match=r"^loss.guide_model: .*vocabulary \(4001 tokens\) differs"):
        check_model(spec_with(str(tmp_path / "vocab")))


def test_tokenizers_with_one_vocabulary_but_other_normalization_differ():
    from transformers import AutoTokenizer

    from koe5.train.guide import tokenizer_mismatch

    path = resolve_model_path("builtin:tiny-ko-bert")
    plain = AutoTokenizer.from_pretrained(path)
    assert tokenizer_mismatch(plain, AutoTokenizer.from_pretrained(path)) is None
    lower = AutoTokenizer.from_pretrained(path, do_lower_case=not plain.do_lower_case)
    assert plain.get_vocab() == lower.get_vocab()
    assert "tokenizes" in tokenizer_mismatch(plain, lower)


def test_the_loaded_guide_is_frozen(other_guide):
    from koe5.spec.schema import DataSpec, LossSpec, ModelSpec, SourceSpec, Spec
    from koe5.train.guide import load_guide

    spec = Spec(name="g", model=ModelSpec(name_or_path="builtin:tiny-ko-bert", pooling="cls"),
                data=DataSpec(sources=[SourceSpec(path="x")]), loss=LossSpec(guide_model=other_guide))
    guide = load_guide(spec, resolve_model_path("builtin:tiny-ko-bert"), other_guide, torch.device("cpu"))
    assert not guide.training and guide.pooling == "cls" and guide.normalize
    assert not any(p.requires_grad for p in guide.parameters())
