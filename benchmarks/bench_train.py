"""Training-step speed: koe5's GradCache step against sentence-transformers' CachedMultipleNegativesRankingLoss.

    python benchmarks/bench_train.py                                   # CPU, tiny shape (the CI smoke run)
    python benchmarks/bench_train.py --shape e5-small --batch 32 --chunk 16
    python benchmarks/bench_train.py --device cuda --all --out $OUT/train.jsonl   # the GPU sweep (issue 9)
    python benchmarks/bench_train.py --device cuda --shape e5-large --batch 512 --chunk 128 --variants koe5 \
        --set cache.chunk_tokens=32768                                            # one spec-level lever
    ... --prefetch 2           # issue 17 lever 4: koe5's inputs padded on the host per step, 2 steps ahead
    ... --no-host-lengths      # issue 17 lever 3 off: batches without host lengths (GradCache reads the mask)

Both sides train the same random-weight encoder (multilingual-e5 shapes) on the same synthetic batches:
queries up to 32 tokens, passages up to 256 (real lengths uniform in [L/2, L]), one hard negative, AdamW.
koe5's side is the code `koe5-run` trains with: `build_engine` (the DeepSpeed engine) and `train_step`.
The sentence-transformers side is used the way the Hugging Face Trainer uses it: forward under autocast
on CUDA, backward outside it (where the cached loss replays its chunks, hence in fp32), plus the variant
with the backward inside autocast too.

MFU counts 6 x non-embedding parameters x real tokens + 12 x layers x hidden x sum(len^2) (attention) per
step, against a matmul peak measured in the same run (bf16 on CUDA, fp32 on CPU). Output: one JSON line
per measurement (stdout, and --out), then a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # layers, hidden, heads, ffn, vocab
    "tiny": (2, 64, 4, 128, 1000),
    "e5-small": (12, 384, 12, 1536, 250_002),
    "e5-large": (24, 1024, 16, 4096, 250_002),
}
Q_LEN, P_LEN = 32, 256


def build_model_dir(shape: str, out: Path) -> Path:
    """A random-weight BERT of the shape, saved with koe5's demo tokenizer (the ids are synthetic anyway)."""
    from transformers import BertConfig, BertModel

    from koe5.demo_model import build_demo_model

    layers, hidden, heads, ffn, vocab = SHAPES[shape]
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=512,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                      add_pooling_layer=False)
    model.save_pretrained(out)
    demo = build_demo_model()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo / name, out / name)
    return out


def synthetic_batch(rows: int, max_len: int, vocab: int, gen: torch.Generator, device) -> dict:
    """Model inputs with each row's length on the host (koe5.inputs.ModelInputs), as the trainer's collate
    gives them (issue 17, lever 3)."""
    from koe5.inputs import ModelInputs, padded_length

    lengths = torch.randint(max_len // 2, max_len + 1, (rows,), generator=gen)
    width = padded_length(int(lengths.max()))
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, vocab, (rows, width), generator=gen) * mask
    return ModelInputs({"input_ids": ids, "attention_mask": mask}, lengths.tolist()).to(device)


def step_flops(batches: list[dict], shape: str) -> float:
    layers, hidden, _, ffn, _ = SHAPES[shape]
    params = layers * (4 * hidden * hidden + 2 * hidden * ffn)  # attention projections + MLP
    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches]).double()
    return float(6 * params * lengths.sum() + 12 * layers * hidden * (lengths ** 2).sum())


def matmul_peak(device: torch.device) -> float:
    """FLOP/s of a large matmul: bf16 on CUDA, fp32 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps, start = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB -> GiB)


def reset_memory(device: torch.device) -> None:
    gc.collect()  # the previous measurement's engine and optimizer states
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def make_batches(n: int, batch: int, vocab: int, device) -> list[tuple[dict, dict]]:
    """(queries, documents): documents hold the positives, then one hard negative per query."""
    gen = torch.Generator().manual_seed(1)
    return [(synthetic_batch(batch, Q_LEN, vocab, gen, device), synthetic_batch(2 * batch, P_LEN, vocab, gen, device))
            for _ in range(n)]


def bench_spec(model_dir: Path, batch: int, chunk: int, device_type: str, precision: str, overrides: list[str]):
    """The spec koe5's side trains with. `overrides` are spec overrides (`cache.chunk_tokens=32768`): a lever
    that is a spec key is measured without editing code. Raises SpecError for a bad override."""
    from koe5.spec import expand_text

    return expand_text(f"""
name: bench
model: {{name_or_path: {model_dir}, query_max_len: {Q_LEN}, passage_max_len: {P_LEN}}}
data: {{sources: [{{path: {ROOT / 'koe5/assets/ko_sample/train.jsonl'}}}]}}
loss: {{temperature: 0.05, mask_duplicates: false}}
cache: {{chunk_size: {chunk}}}
train: {{batch_size: {batch}, max_steps: 1000, lr: 1.0e-5, precision: {precision}, device: {device_type}}}
""", overrides, check_devices=False)[0].spec


def koe5_runner(model_dir: Path, batch: int, chunk: int, device: torch.device, precision: str,
                overrides: list[str]):
    """A function doing one koe5 training step on (queries, positives, negatives)."""
    from koe5.train.step import train_step
    from koe5.train.trainer import build_engine, init_distributed, step_config

    spec = bench_spec(model_dir, batch, chunk, device.type, precision, overrides)
    init_distributed(device.type)
    engine, _, _, _ = build_engine(spec, str(model_dir), 1, 1000)
    cfg = step_config(spec)

    def step(queries, docs):
        ids = torch.arange(len(docs["input_ids"]), device=device)
        return train_step(engine, queries, docs, ids, cfg, device).loss

    return step, engine


def st_runner(model_dir: Path, chunk: int, device: torch.device, replay_in_autocast: bool):
    """One sentence-transformers CachedMNRL step, as the Hugging Face Trainer drives it."""
    from sentence_transformers import SentenceTransformer, models
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss

    word = models.Transformer(str(model_dir), max_seq_length=P_LEN)
    model = SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), "mean"),
                                         models.Normalize()], device=str(device))
    loss_fn = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=chunk)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    autocast = device.type == "cuda"

    def step(queries, docs):
        b = len(queries["input_ids"])
        positives, negatives = ({k: v[:b] for k, v in docs.items()}, {k: v[b:] for k, v in docs.items()})
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn([queries, positives, negatives], None)
            if replay_in_autocast:
                loss.backward()
        if not replay_in_autocast:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step, model


def time_steps(step, batches, device, prefetch=None) -> tuple[float, float]:
    """(seconds per step after the first, loss of the last step). `prefetch` (issue 17, lever 4): None times
    the steps on batches already on the device; N >= 0 also times their input path, as the trainer runs it:
    each batch padded on the host from its rows' token ids (koe5.inputs.pad_token_ids, the collate's padding),
    N steps ahead in koe5/data/prefetch.py's thread, page-locked and copied without blocking on CUDA if N > 0."""
    from koe5.data.prefetch import Prefetcher
    from koe5.inputs import pad_token_ids

    pinned = bool(prefetch) and device.type == "cuda"
    rows = [[[x["input_ids"][i, :n].tolist() for i, n in enumerate(x["attention_mask"].sum(1).tolist())]
             for x in pair] for pair in batches]

    def host_batch(i: int):  # the trainer's host work for one step, then its copy to the device
        q, d = (pad_token_ids(r, 0, m) for r, m in zip(rows[i], (Q_LEN, P_LEN)))
        return (q.pin_memory(), d.pin_memory()) if pinned else (q, d)

    def on_device(pair):
        return tuple(x.to(device, non_blocking=pinned) for x in pair)

    step(*on_device(batches[0]))  # warm-up: allocations, kernels, DeepSpeed's first-step work
    sync(device)
    start = time.perf_counter()
    if prefetch is None:
        for queries, docs in batches[1:]:
            loss = step(queries, docs)
    else:
        with Prefetcher(host_batch, range(1, len(batches)), prefetch) as prepared:
            for pair in prepared:
                loss = step(*on_device(pair))
    sync(device)
    return (time.perf_counter() - start) / (len(batches) - 1), loss


def measure(variant: str, shape: str, batch: int, chunk: int, steps: int, device: torch.device, peak: float,
            model_dir: Path, precision: str, overrides: list[str], prefetch: int | None = None,
            host_lengths: bool = True) -> dict:
    vocab = SHAPES[shape][4]
    prefetch = prefetch if variant == "koe5" else None  # the anchor's inputs stay premade on the device
    batches = make_batches(steps + 1, batch, vocab, device if prefetch is None else torch.device("cpu"))
    reset_memory(device)
    if variant == "koe5":
        step, owner = koe5_runner(model_dir, batch, chunk, device, precision, overrides)
        if not host_lengths:  # plain dicts: GradCache reads each batch's lengths from the device mask
            with_lengths = step

            def step(queries, docs):
                return with_lengths(dict(queries), dict(docs))
    else:
        step, owner = st_runner(model_dir, chunk, device, replay_in_autocast=variant == "st-replay-autocast")
    seconds, loss = time_steps(step, batches, device, prefetch)
    counter = getattr(owner.module.backbone, "koe5_compiles", None) if variant == "koe5" else None
    flops = step_flops(list(batches[1]), shape)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[1])
    row = {"measure": "train_step", "variant": variant, "shape": shape, "batch": batch, "chunk": chunk,
           "device": device.type, "precision": precision if variant == "koe5" else "autocast-bf16"
           if device.type == "cuda" else "fp32", "steps_timed": steps, "s_per_step": round(seconds, 4),
           "triples_per_s": round(batch / seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
           "mfu": round(flops / seconds / peak, 4), "peak_mem_gib": round(peak_memory_gib(device), 3),
           "final_loss": round(float(loss), 4), "overrides": overrides if variant == "koe5" else [],
           # what the trained module really ran (model.attention), not only what was asked for
           "attention": owner.module.attention if variant == "koe5" else "padded",
           "prefetch": prefetch, "host_lengths": host_lengths if variant == "koe5" else None,
           # train.compile: graphs compiled, warm-up included (a count above the warm-up's means recompiles)
           "compiles": None if counter is None else counter.graphs}
    del owner
    return row


def measure_encoding(shape: str, model_dir: Path, device: torch.device, peak: float, n: int) -> dict:
    from koe5.encoder import load_encoder

    encoder = load_encoder(str(model_dir), device=str(device))
    gen = torch.Generator().manual_seed(2)
    batch = synthetic_batch(n, P_LEN, SHAPES[shape][4], gen, device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        encoder.model(**{k: v[:64] for k, v in batch.items()})
        sync(device)
        start = time.perf_counter()
        for s in range(0, n, 256):
            encoder.model(**{k: v[s:s + 256] for k, v in batch.items()})
        sync(device)
    seconds = time.perf_counter() - start
    layers, hidden, _, ffn, _ = SHAPES[shape]
    lengths = batch["attention_mask"].sum(1).double()
    flops = float(2 * layers * (4 * hidden * hidden + 2 * hidden * ffn) * lengths.sum()
                  + 4 * layers * hidden * (lengths ** 2).sum())
    return {"measure": "encode", "shape": shape, "device": device.type, "passages": n,
            "passages_per_s": round(n / seconds, 1), "mfu": round(flops / seconds / peak, 4)}


def print_table(rows: list[dict]) -> None:
    train = [r for r in rows if r["measure"] == "train_step"]
    print(f"\n{'variant':20s} {'shape':9s} {'batch':>6s} {'chunk':>6s} {'triples/s':>10s} {'tokens/s':>10s} "
          f"{'MFU':>7s} {'peak GiB':>9s}")
    for r in train:
        print(f"{r['variant']:20s} {r['shape']:9s} {r['batch']:6d} {r['chunk']:6d} {r['triples_per_s']:10.2f} "
              f"{r['tokens_per_s']:10.1f} {100 * r['mfu']:6.2f}% {r['peak_mem_gib']:9.3f}")
    by_key: dict = {}
    for r in train:
        by_key.setdefault((r["shape"], r["batch"], r["chunk"]), {})[r["variant"]] = r["triples_per_s"]
    for (shape, batch, chunk), v in by_key.items():
        for other in ("st-cached-mnrl", "st-replay-autocast"):
            if "koe5" in v and other in v:
                print(f"koe5 / {other} ({shape}, batch {batch}, chunk {chunk}): {v['koe5'] / v[other]:.2f}x")
    for r in rows:
        if r["measure"] == "encode":
            print(f"encode {r['shape']}: {r['passages_per_s']} passages/s, MFU {100 * r['mfu']:.2f}%")
        if r["measure"] == "peak":
            print(f"matmul peak ({r['dtype']}): {r['tflops']:.2f} TFLOP/s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[16])
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after one warm-up)")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="koe5, st-cached-mnrl, st-replay-autocast (default: all that apply to the device)")
    ap.add_argument("--encode", type=int, default=0, help="also time encoding this many passages")
    ap.add_argument("--all", action="store_true",
                    help="the GPU sweep of issue 9: e5-large batch 512, e5-small batch 2048, e5-small memory "
                         "at batch 512 vs 16384 (chunk 128), encoding")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a spec override for koe5's side, e.g. cache.chunk_tokens=32768 (repeatable)")
    ap.add_argument("--attention", choices=["padded", "varlen"], default=None,
                    help="koe5's model.attention (issue 17, lever 5): the same as --set model.attention=...")
    ap.add_argument("--prefetch", type=int, default=None, metavar="N",
                    help="issue 17 lever 4: time koe5's input path too, each batch padded on the host and built "
                         "N steps ahead by a thread (0 = serially); default: batches premade on the device")
    ap.add_argument("--no-host-lengths", dest="host_lengths", action="store_false",
                    help="issue 17 lever 3 off: batches without host lengths, so GradCache reads each batch's "
                         "lengths from the device (once per pass)")
    ap.add_argument("--models", metavar="DIR",
                    help="keep the random-weight models here and reuse them on later calls (a lever matrix runs "
                         "this script once per lever; benchmarks/device/levers.sh)")
    ap.add_argument("--out", help="append the JSON lines to this file")
    args = ap.parse_args(argv)
    if args.attention:
        args.overrides.append(f"model.attention={args.attention}")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_train: --device cuda, but no CUDA device is visible", file=sys.stderr)
        return 2
    precision = "bf16" if device.type == "cuda" else "fp32"
    variants = args.variants or (["koe5", "st-cached-mnrl", "st-replay-autocast"] if device.type == "cuda"
                                 else ["koe5", "st-cached-mnrl"])
    plan = [(args.shape, b, args.chunk, variants) for b in args.batch]
    encode = [(args.shape, args.encode)] if args.encode else []
    if args.all:
        plan = [("e5-large", 512, 128, variants), ("e5-small", 2048, 512, variants),
                # memory flatness: the same chunk size at batch 512 and 16,384
                ("e5-small", 512, 128, ["koe5"]), ("e5-small", 16384, 128, ["koe5"])]
        encode = [("e5-large", 8192), ("e5-small", 16384)]

    if args.overrides:
        from koe5.spec import SpecError

        try:  # a typo in --set should stop here, not after minutes of model building
            bench_spec(ROOT, 16, 8, device.type, precision, args.overrides)
        except SpecError as e:
            print(f"bench_train: --set: {e}", file=sys.stderr)
            return 2

    peak = matmul_peak(device)
    rows = [{"measure": "peak", "device": device.type, "dtype": "bf16" if device.type == "cuda" else "fp32",
             "tflops": round(peak / 1e12, 3),
             "card": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
             "torch": torch.__version__}]
    with tempfile.TemporaryDirectory(prefix="koe5-bench-") as tmp:
        dirs: dict[str, Path] = {}
        if args.models:  # built by an earlier call (same seed, same weights)
            Path(args.models).mkdir(parents=True, exist_ok=True)
            dirs = {p.name: p for p in Path(args.models).iterdir() if (p / "config.json").exists()}
        models = Path(args.models) if args.models else Path(tmp)
        for shape, batch, chunk, names in plan:
            if shape not in dirs:
                dirs[shape] = build_model_dir(shape, models / shape)
            for variant in names:
                rows.append(measure(variant, shape, batch, chunk, args.steps, device, peak, dirs[shape], precision,
                                    args.overrides, args.prefetch, args.host_lengths))
                print(json.dumps(rows[-1]), flush=True)
        for shape, n in encode:
            if shape not in dirs:
                dirs[shape] = build_model_dir(shape, models / shape)
            rows.append(measure_encoding(shape, dirs[shape], device, peak, n))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print_table(rows)
    if torch.distributed.is_initialized():  # koe5's side set up a one-rank group; NCCL warns if it is left open
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
