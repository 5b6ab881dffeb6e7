"""`train.compile`: the backbone compiled once with `torch.compile` (issue 17, lever 2), and its compiles counted.

`nn.Module.compile` compiles the module in place, so parameter names, checkpoints and the export are the
same as uncompiled. GradCache's chunks change shape (rows and width) from chunk to chunk; torch.compile's
automatic dynamic shapes compile a graph with symbolic sizes after the first size change instead of one graph
per shape, so the count levels off after a few compiles (the no-grad pass and the replay are separate graphs,
and so is each graph break). The trainer logs the count (`compiles` in train_log.jsonl): a count that keeps
growing means recompiles, which cost more than compiling saves.

Dropout: the compiled forward draws its random numbers from the default generators (inductor seeds its own
generator from them on every call), so GradCache's RNG save and restore per chunk (koe5/train/gradcache.py)
gives the replay the masks of the no-grad pass, as uncompiled.
"""

from __future__ import annotations

import os

import torch

# The backend; tests set it to `aot_eager` (the same graph capture and autograd, without inductor's code
# generation, which takes minutes on a 2-core CPU). Not a spec key: a run compiles with inductor.
BACKEND_ENV = "KOE5_COMPILE_BACKEND"


class CountingBackend:
    """A torch.compile backend that counts the graphs it is asked to compile, then compiles them with `name`."""

    def __init__(self, name: str):
        import torch._dynamo

        self.name = name
        self.compile_graph = torch._dynamo.lookup_backend(name)
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return self.compile_graph(graph_module, example_inputs)


def compile_backbone(backbone: torch.nn.Module, backend: str | None = None) -> CountingBackend:
    """Compile `backbone` in place; the returned backend's `.graphs` is the number of compiles so far."""
    counter = CountingBackend(backend or os.environ.get(BACKEND_ENV, "inductor"))
    backbone.compile(backend=counter)
    return counter
