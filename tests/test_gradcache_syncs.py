"""GradCache reads nothing back from the device per chunk (issue 17, lever 3).

On a GPU every `.item()`, `.tolist()`, `.cpu()` or truth test of a device tensor waits for all queued work;
one per chunk serializes the host with the GPU. CUDA's sync debug mode is CUDA-only, so on the CPU a
TorchFunctionMode counts the calls that would be syncs on a GPU, made by GradCache's own code (the model
here is a sync-free mean of embeddings; the loss is not GradCache's and is not counted). The counts must
not grow with the number of chunks: one chunk or one per row, the same count."""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from koe5.inputs import ModelInputs, pad_token_ids
from koe5.train.gradcache import embed_without_grad, make_chunks, replay

SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
         torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}


class CountSyncs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


class MeanEmbedding(torch.nn.Module):
    """A model without syncs of its own, so only GradCache's are counted (BERT's mask code has some)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(120, 16)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask[..., None].float()
        return F.normalize((self.emb(input_ids) * mask).sum(1) / mask.sum(1), dim=-1)


def sample_inputs(rows: int = 12) -> ModelInputs:
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 40, (rows,), generator=gen).tolist()
    return pad_token_ids([torch.randint(5, 120, (n,), generator=gen).tolist() for n in lengths], 0, 64)


def syncs_of_a_cached_pass(batch, chunk_size=1, chunk_tokens=None) -> tuple[int, int, torch.Tensor]:
    """(syncs while cutting chunks, syncs in the no-grad pass + replay, the replayed gradient of the weights)."""
    model = MeanEmbedding().train()
    with CountSyncs() as cutting:
        chunks = make_chunks(batch, chunk_size, chunk_tokens)
    with CountSyncs() as passes:
        emb, states = embed_without_grad(model, batch, chunks, torch.device("cpu"))
        replay(model, batch, chunks, states, torch.ones_like(emb), lambda s: s.backward())
    return len(cutting.calls), len(passes.calls), model.emb.weight.grad


@pytest.mark.parametrize("chunking", ["rows", "tokens"])
def test_no_host_sync_per_chunk(chunking):
    batch = sample_inputs()
    if chunking == "rows":
        one, many = dict(chunk_size=12), dict(chunk_size=1)
    else:
        one, many = dict(chunk_tokens=10_000), dict(chunk_tokens=40)
    cut_one, pass_one, grad_one = syncs_of_a_cached_pass(batch, **one)
    cut_many, pass_many, grad_many = syncs_of_a_cached_pass(batch, **many)
    assert len(make_chunks(batch, **{"chunk_size": 1, "chunk_tokens": None, **one})) == 1
    assert len(make_chunks(batch, **{"chunk_size": 1, "chunk_tokens": None, **many})) >= 6
    assert pass_many == pass_one <= 2  # at most one host-tensor conversion per pass, whatever the chunks
    assert cut_one == cut_many == 0  # the lengths came from the host: nothing read from the mask
    torch.testing.assert_close(grad_many, grad_one)  # and the chunked passes still compute the same thing


def test_a_plain_dict_reads_its_lengths_once_per_batch():
    """A caller without host lengths (a plain dict of tensors) still works: one read of the mask per batch."""
    batch = dict(sample_inputs())
    assert not hasattr(batch, "lengths")
    cut, passes, _ = syncs_of_a_cached_pass(batch, chunk_tokens=40)
    assert cut == 1 and passes <= 4


def test_host_lengths_are_the_masks():
    """GradCache trims every chunk by these lengths: a wrong one would cut real tokens."""
    batch = sample_inputs()
    assert batch.lengths == batch["attention_mask"].sum(1).tolist()
    moved = batch.to(torch.device("cpu"))
    assert isinstance(moved, ModelInputs) and moved.lengths == batch.lengths
    assert set(batch) == {"input_ids", "attention_mask"}  # model(**batch) gets only the tensors
