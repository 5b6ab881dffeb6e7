"""Write a trained encoder as a sentence-transformers directory that is also a plain Hugging Face model.

Layout: the backbone's config, weights and tokenizer at the top (so `AutoModel.from_pretrained(path)`
works), plus modules.json, 1_Pooling/, 2_Normalize/ and the query/passage prompts that
`SentenceTransformer(path)` reads, and a README.md model card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from koe5 import __version__


def export_model(backbone: torch.nn.Module, tokenizer, out_dir: str | Path, *, pooling: str, normalize: bool,
                 query_prefix: str, passage_prefix: str, max_seq_length: int,
                 state_dict: Optional[dict] = None, card: str = "") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
        "prompts": {"query": query_prefix, "passage": passage_prefix},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if normalize else "dot",
        "__version__": {"koe5": __version__},
    })
    (out / "README.md").write_text(card or "# koe5 model\n", encoding="utf-8")
    return out


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def model_card(*, name: str, base_model: str, spec_yaml: str, data_mix: dict, results_table: str = "") -> str:
    """A README.md for the exported model: what it was trained from, on what, and how it scored."""
    mix = "\n".join(f"| {src} | {info.get('examples', '')} | {info.get('weight', '')} |"
                    for src, info in data_mix.items())
    return f"""---
library_name: sentence-transformers
base_model: {base_model}
tags: [sentence-transformers, koe5, korean, retrieval]
---
# {name}

Fine-tuned from `{base_model}` with koe5 {__version__} (InfoNCE, GradCache).
Use the prompts: queries start with the `query` prompt and passages with the `passage` prompt
(`model.encode(texts, prompt_name="query")`).

## Data mix
| source | examples | weight |
|---|---|---|
{mix}

## Evaluation
{results_table or "(not evaluated)"}

## Resolved spec
```yaml
{spec_yaml.rstrip()}
```
"""
