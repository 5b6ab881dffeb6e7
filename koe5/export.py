"""Write a trained encoder as a sentence-transformers directory that is also a plain Hugging Face model.

Layout: the backbone's config, weights and tokenizer at the top (so `AutoModel.from_pretrained(path)`
works), plus modules.json, 1_Pooling/, 2_Normalize/ and the prompts that `SentenceTransformer(path)` reads
(`encode_query` uses the `query` prompt, `encode_document` the `document` one), and a README.md model card
that names nothing of the training machine (`model_card`).

The weights include the backbone's pooler head when its architecture has one (BERT, XLM-R): koe5 trains
without it (`koe5.model.load_backbone` sets it aside), and saves it back untouched, as a model fine-tuned
in sentence-transformers would have it, so loading the directory reports no missing weights.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from koe5 import __version__


def export_model(backbone: torch.nn.Module, tokenizer, out_dir: str | Path, *, pooling: str, normalize: bool,
                 query_prefix: str, passage_prefix: str, max_seq_length: int,
                 state_dict: Optional[dict] = None, card: str = "") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The head set aside at load time goes back beside the trained weights (see the module docstring).
    head = getattr(backbone, "koe5_pooler_state", None) or {}
    if head:
        state_dict = {**(state_dict if state_dict is not None else backbone.state_dict()), **head}
    backbone.save_pretrained(out, state_dict=state_dict, is_main_process=True)
    tokenizer.save_pretrained(out)

    dim = backbone.config.hidden_size
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (out / "2_Normalize").mkdir(exist_ok=True)
    (out / "1_Pooling").mkdir(exist_ok=True)
    _write_json(out / "1_Pooling" / "config.json", {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    })
    _write_json(out / "modules.json", modules)
    _write_json(out / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    _write_json(out / "config_sentence_transformers.json", {
        "prompts": prompts(query_prefix, passage_prefix),
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if normalize else "dot",
        "__version__": {"koe5": __version__},
    })
    (out / "README.md").write_text(card or "# koe5 model\n", encoding="utf-8")
    return out


def prompts(query_prefix: str, passage_prefix: str) -> dict[str, str]:
    """The prompts under the names sentence-transformers looks for: `query` (encode_query), `document`
    (encode_document; sentence-transformers 5+ adds an empty one when a model declares none, which would
    encode passages without their prefix) and `passage`, the name older callers pass as prompt_name."""
    return {"query": query_prefix, "document": passage_prefix, "passage": passage_prefix}


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---- the model card ------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HF_CACHE_DIR = re.compile(r"models--([^/\\]+?)--([^/\\]+)")


def portable_model_name(name_or_path: str) -> tuple[str, bool]:
    """(a name that means something off the training machine, whether it is a hub id). A hub id stays
    as it is; a directory of the Hugging Face cache (`.../models--org--name/snapshots/<rev>`) becomes the
    hub id it caches; any other local directory is named by its last component (not a hub id)."""
    text = str(name_or_path)
    cached = _HF_CACHE_DIR.search(text.replace("\\", "/"))
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}", True
    if _is_local_path(text):
        return Path(text.rstrip("/\\")).name or text, False
    return text, bool(_HUB_ID.match(text))


def _is_local_path(text: str) -> bool:
    return (os.path.isabs(text) or text.startswith(("~", "./", "../", ".\\", "..\\"))
            or re.match(r"^[A-Za-z]:[\\/]", text) is not None or os.path.isdir(text))


def portable_spec_yaml(spec_yaml: str) -> str:
    """The resolved spec with every local path (data files, benchmarks, output and registry directories,
    a local base model) replaced by its last component: the card says what was trained on, not where the
    files lay. Its comment lines (the spec hash) stay."""
    data = yaml.safe_load(spec_yaml) or {}

    def walk(value: Any) -> Any:
        if isinstance(value, dict):  # keys too: a frozen spec's `fingerprints` are keyed by path
            return {walk(k): walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, str) and _is_local_path(value) and not _HUB_ID.match(value):
            return portable_model_name(value)[0]
        return value

    from koe5.spec.yamlio import dump_yaml

    comments = "".join(line + "\n" for line in spec_yaml.splitlines() if line.startswith("#"))
    return comments + dump_yaml(walk(data))


def model_card(*, spec, spec_yaml: str, data_mix: dict, steps: Optional[int] = None,
               world_size: Optional[int] = None, max_seq_length: Optional[int] = None,
               results_table: str = "") -> str:
    """A README.md for the exported model: what it was trained from, on what data, how, and how it scored
    (`results_table`, filled in after evaluation). Portable: no path of the training machine appears."""
    m, t, loss = spec.model, spec.train, spec.loss
    base, is_hub_id = portable_model_name(m.name_or_path)
    if is_hub_id:
        base_note = ""
    elif _is_local_path(m.name_or_path):
        base_note = " (a local model, named here by its directory's name; not a Hugging Face hub id)"
    elif m.name_or_path.startswith("builtin:"):
        base_note = " (koe5's built-in demonstration model, not a Hugging Face hub id)"
    else:
        base_note = " (not a Hugging Face hub id)"
    sources = {k: v for k, v in data_mix.items() if not k.startswith("_") and isinstance(v, dict)}
    mix = "\n".join(f"| {src} | {info.get('examples', '')} | {info.get('tokens', '')} | {info.get('weight', '')} |"
                    for src, info in sources.items()) or "| (not recorded) | | | |"
    front = ["library_name: sentence-transformers", "pipeline_tag: sentence-similarity"]
    if is_hub_id:
        front.append(f"base_model: {base}")
    front.append("tags: [sentence-transformers, sentence-similarity, feature-extraction, koe5, korean, retrieval]")
    front.append("language: [ko]")
    steps_text = steps if steps is not None else (t.max_steps if t.max_steps is not None else f"{t.epochs} epochs")
    hyper = [
        ("base model", f"`{base}`{base_note}"),
        ("loss", f"{loss.name} (temperature {loss.temperature}; in-batch"
                 f"{' and cross-device' if loss.cross_device_negatives else ''} negatives,"
                 f" {spec.data.hard_negatives} hard negative(s) per query)"),
        ("batch size", f"{t.batch_size} queries (global)" + (f", over {world_size} process(es)" if world_size else "")),
        ("learning rate", f"{t.lr} (AdamW, weight decay {t.weight_decay}, {t.scheduler} schedule, "
                          f"warmup ratio {t.warmup_ratio})"),
        ("steps", str(steps_text)),
        ("precision", t.precision),
        ("max lengths (training)", f"query {m.query_max_len}, passage {m.passage_max_len} tokens"),
        ("max length (this export)", f"{max_seq_length} tokens" if max_seq_length else "the model's own"),
        ("pooling", f"{m.pooling}{', L2-normalized' if m.normalize else ''}"),
        ("prompts", f"query `{m.query_prefix}`, passage `{m.passage_prefix}`"),
        ("GradCache", "off" if not spec.cache.enabled else (
            f"chunks packed to {spec.cache.chunk_tokens} tokens" if spec.cache.chunk_tokens
            else f"chunks of {spec.cache.chunk_size}")),
        ("seed", str(spec.seed)),
    ]
    if loss.guide_model:
        guide, _ = portable_model_name(loss.guide_model)
        hyper.append(("guided false-negative filtering", f"guide `{guide}`, {loss.guide_margin_strategy} margin "
                                                         f"{loss.guide_margin}"))
    if loss.matryoshka_dims:
        # Declared so a user can load the model truncated: SentenceTransformer(path, truncate_dim=d).
        dims = ", ".join(str(d) for d in loss.matryoshka_dims)
        hyper.append(("Matryoshka widths", f"{dims}: load truncated with "
                                           f"`SentenceTransformer(path, truncate_dim={min(loss.matryoshka_dims)})`"))
    if loss.distill_weight:
        hyper.append(("score distillation", f"KL to stored teacher scores, weight {loss.distill_weight}, teacher "
                                            f"temperature {loss.distill_temperature}"))
    hyper_rows = "\n".join(f"| {k} | {v} |" for k, v in hyper)
    return f"""---
{chr(10).join(front)}
---
# {spec.name}

A Korean text-embedding model fine-tuned from `{base}`{base_note} with koe5 {__version__}.

## Usage (sentence-transformers)
The prompts are part of the model: `encode_query` puts `{m.query_prefix}` before each query and
`encode_document` puts `{m.passage_prefix}` before each passage.

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("PATH_OR_HUB_ID")
q = model.encode_query(["질문"])
d = model.encode_document(["문서 본문"])
scores = model.similarity(q, d)
```

## Training
| setting | value |
|---|---|
{hyper_rows}

### Data mix
Examples and tokens drawn from each source during training.

| source | examples | tokens | weight |
|---|---|---|---|
{mix}

## Evaluation
{results_table or "(not evaluated)"}

## Resolved spec
Local paths are shown by their last component only.

```yaml
{portable_spec_yaml(spec_yaml).rstrip()}
```
"""
