"""The builtin demonstration model: a tiny BERT with a WordPiece vocabulary learnt from koe5's own
Korean sample, built on first use and cached. It lets the quickstart and the tests train for real,
offline, in minutes on a CPU. It is not a useful embedding model; point `model.name_or_path` at
`intfloat/multilingual-e5-large` (or any local Hugging Face directory) for real work.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from koe5.paths import cache_root

BUILTIN_NAME = "builtin:tiny-ko-bert"
SAMPLE_TRAIN = Path(__file__).parent / "assets" / "ko_sample" / "train.jsonl"

# Changing any of these changes the cache key, so an old cached build is never reused by mistake.
BUILD_VERSION = 3  # 2: the vocabulary knows the E5 prefixes and ASCII; 3: the same vocabulary on every machine
CONFIG = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
              max_position_embeddings=512, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
VOCAB_SIZE = 4000


def _sample_texts() -> list[str]:
    """The sample's texts as the model reads them, E5 prefixes included, so `query:` and `passage:` are
    words of the vocabulary rather than [UNK] pieces."""
    texts = []
    with open(SAMPLE_TRAIN, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts += ["query: " + row["query"], "passage: " + row["document"], "passage: " + row["hard_negative"]]
    return texts


def build_demo_model(cache_dir: Path | None = None) -> Path:
    """Directory of the demo model, building it if this exact recipe has not been built yet."""
    from filelock import FileLock

    key = hashlib.sha256(SAMPLE_TRAIN.read_bytes() + json.dumps([BUILD_VERSION, CONFIG, VOCAB_SIZE]).encode())
    target = (cache_dir or cache_root() / "models") / f"tiny-ko-bert-{key.hexdigest()[:12]}"
    done = target / ".complete"
    if done.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Ranks of one job (and parallel tests) may all ask at once: one builds, the others wait.
    with FileLock(str(target) + ".lock"):
        if not done.exists():
            _build(target)
    return target


def _vocabulary(normalizer, pre_tokenizer) -> list[str]:
    """Special tokens, every character of the sample and of printable ASCII (alone and as a `##`
    continuation), then the sample's most frequent whole words, ties broken by the word itself.

    Counted here rather than by the `tokenizers` WordPiece trainer, whose choice among equally frequent
    merges changes from one process to the next: the demo model, and every number measured with it,
    would then differ between this machine and CI."""
    from collections import Counter

    words = Counter(w for text in _sample_texts()
                    for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w} | {chr(c) for c in range(33, 127)})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    known = set(vocab)
    for word, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= VOCAB_SIZE:
            break
        if word not in known:
            vocab.append(word)
    return vocab


def _build(target: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    # No accent stripping and no lowercasing: NFD accent stripping would split Hangul syllables into jamo.
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                            strip_accents=False, lowercase=False)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    vocab = _vocabulary(normalizer, pre_tokenizer)
    # Every printable ASCII character is in the vocabulary, so English words, digits and punctuation in
    # a user's text split into known pieces instead of [UNK].
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tokenizer = BertTokenizerFast(tokenizer_object=tok, do_lower_case=False, strip_accents=False,
                                  model_max_length=CONFIG["max_position_embeddings"])
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])

    with torch.random.fork_rng():  # a fixed init that leaves the caller's RNG untouched
        torch.manual_seed(0)
        model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **CONFIG), add_pooling_layer=False)

    # Build beside the target, then move it in and mark it complete last: a crash mid-build leaves
    # no directory that looks finished.
    shutil.rmtree(target, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
        (target / ".complete").touch()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
