"""What must hold before a run is recorded, so a bad input stops `koe5-run` in seconds with one line naming
the file:line or key, not hours later with a traceback: every tracker of train.report_to has its library,
every training source reads and tokenizes, the training text does not leak into the benchmarks
(data.leakage), and the evaluation lengths fit the model."""

from __future__ import annotations

import os
import sys


class ModelError(ValueError):
    """model.name_or_path does not load; the message names the key and says what to do."""


def check_trackers(spec) -> None:
    """Every tracker of train.report_to must import here, or the run would fail (or report nothing) after
    hours of training. Raises TrackerError (a ValueError) naming the key and the pip command."""
    from koe5.track import check_installed

    check_installed(spec.train.report_to)


def check_model(spec) -> None:
    """model.name_or_path must load (its config and tokenizer; not the weights) before anything else reads
    it, so a typo or an offline hub id is one line naming the key, not a traceback from transformers. So
    must loss.guide_model, whose tokenizer must be the model's."""
    from koe5.train.guide import check_guide

    path = _loadable(spec.model.name_or_path, "model.name_or_path")
    _check_matryoshka_width(spec, path)
    _check_attention(spec, path)
    if spec.loss.guide_model is not None:
        # loss.guide_model: it loads too, and reads the model's token ids (koe5/train/guide.py)
        guide_path = _loadable(spec.loss.guide_model, "loss.guide_model")
        reason = check_guide(spec, path, guide_path)
        if reason:
            raise ModelError(f"loss.guide_model: {spec.loss.guide_model}: {reason}.")


def _check_matryoshka_width(spec, path: str) -> None:
    """Every loss.matryoshka_dims and eval.dims width must fit the model's embeddings (its hidden size, from
    its config), so a too-wide evaluation width stops the run before training, not after it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    for key, dims in (("loss.matryoshka_dims", spec.loss.matryoshka_dims), ("eval.dims", spec.eval.dims)):
        too_wide = [d for d in dims or [] if width and d > width]
        if too_wide:
            raise ModelError(f"{key}: {too_wide} wider than the embeddings of "
                             f"{spec.model.name_or_path} ({width} dimensions, its config's hidden_size)")


def _check_attention(spec, path: str) -> None:
    """model.attention: varlen packs tokens the way BERT and XLM-R number positions (koe5/attention.py);
    another architecture is refused here, from its config, before anything is recorded."""
    from transformers import AutoConfig

    from koe5.attention import SUPPORTED

    model_type = getattr(AutoConfig.from_pretrained(path), "model_type", "?")
    if spec.model.attention == "varlen" and model_type not in SUPPORTED:
        raise ModelError(f"model.attention: varlen supports {', '.join(SUPPORTED)} encoders; "
                         f"{spec.model.name_or_path} is {model_type!r}: use model.attention: padded")


def _loadable(name: str, key: str) -> str:
    """The resolved path of a model whose config and tokenizer load; ModelError naming `key` otherwise."""
    from transformers import AutoConfig, AutoTokenizer

    from koe5.model import resolve_model_path

    if name.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise ModelError(f"{key}: {name} is not a directory. Build or copy the model there, or give "
                         "a Hugging Face hub id (e.g. intfloat/multilingual-e5-small).")
    path = resolve_model_path(name)
    try:
        AutoConfig.from_pretrained(path)
        AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        what = ("a directory needs config.json and the tokenizer files" if os.path.isdir(path) else
                "a hub id needs the network or a copy in the Hugging Face cache; offline, download it "
                "elsewhere and give its directory")
        raise ModelError(f"{key}: cannot load {name!r}: {reason} ({what}).") from None
    return path


def check_data(spec) -> dict:
    """Read and tokenize every training source once, into the cache the ranks then map (a bad line stops
    the run here, naming file:line), and compare the training text with the evaluation queries
    (data.leakage). Returns what the run records under data_mix._checks; raises ValueError."""
    from koe5.data.dataset import load_training_data, source_name
    from koe5.data.leakage import find_leaks
    from koe5.eval.benchmark import load_benchmark

    data = load_training_data(spec)
    leaks = find_leaks(data, [load_benchmark(b.path, name=b.name) for b in spec.eval.benchmarks])
    total = sum(r["normalized"] for r in leaks.values())
    if total and spec.data.leakage != "ignore":
        detail = "; ".join(f"{name}: {r['normalized']} queries (e.g. {r['examples'][0]!r})"
                           for name, r in leaks.items() if r["normalized"])
        message = f"{total} evaluation queries also appear in the training data ({detail})"
        if spec.data.leakage == "error":
            raise ValueError(message + ". Remove them from the training data, or set data.leakage=warn.")
        print(f"koe5-run: warning: {message}; their metrics are inflated", file=sys.stderr)
    if data.skipped:
        print(f"koe5-run: warning: skipped bad training lines (data.on_error=skip): {data.skipped}", file=sys.stderr)
    names = [source_name(s) for s in spec.data.sources]
    return {"examples": dict(zip(names, data.sizes)), "leakage": leaks, "skipped_lines": data.skipped,
            # rows each format or holdout left out, and what negative mining kept and rejected, by reason
            "left_out": {name: t.meta.get("left_out", {}) for name, t in zip(names, data.sources)}}


def check_eval_lengths(spec) -> None:
    """eval.query_max_len / eval.passage_max_len, when set, must fit the model's own maximum: otherwise the
    evaluation after training would fail inside the model. The schema only knows they are positive; the
    model's limit needs its config and tokenizer (no weights). Raises LengthError (a ValueError)."""
    from transformers import AutoConfig, AutoTokenizer

    from koe5.eval.model_eval import EncodeSettings, resolve_lengths
    from koe5.model import model_max_length, resolve_model_path

    e = spec.eval
    if not e.benchmarks or (e.query_max_len is None and e.passage_max_len is None):
        return
    path = resolve_model_path(spec.model.name_or_path)
    limit = model_max_length(AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path))
    resolve_lengths(EncodeSettings("", "", e.query_max_len, e.passage_max_len), limit)
