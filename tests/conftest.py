"""Keep every test away from the user's registry and model cache."""

import os
import tempfile


def pytest_configure(config):
    # Set before any test module imports koe5, and inherited by the subprocesses tests start.
    root = tempfile.mkdtemp(prefix="koe5-tests-")
    os.environ["KOE5_REGISTRY"] = os.path.join(root, "registry", "koe5.duckdb")
    os.environ["KOE5_CACHE"] = os.path.join(root, "cache")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # train.compile compiles with aot_eager in tests: inductor's C++ code generation takes minutes per graph
    # on a small CPU (koe5/train/compile.py; tests/test_compile.py says what aot_eager still covers).
    os.environ.setdefault("KOE5_COMPILE_BACKEND", "aot_eager")
