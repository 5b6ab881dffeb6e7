"""The DeepSpeed config, derived from the spec. This is its one source of truth.

`deepspeed.extra` may add raw keys, but a raw key that contradicts a derived value is rejected:
the spec, not a pass-through dict, decides batch size, precision, ZeRO stage and clipping.
"""

from __future__ import annotations

import copy
from typing import Any

from koe5.spec.schema import Spec


def trainer_clips(spec: Spec) -> bool:
    """Whether koe5 clips (and measures) the gradient norm itself: ZeRO-0 with float32 weights, where
    DeepSpeed hands the torch optimizer through unwrapped."""
    return spec.deepspeed.zero_stage == 0 and spec.train.precision != "fp16"


def zero_config(spec: Spec) -> dict[str, Any]:
    ds = spec.deepspeed
    zero: dict[str, Any] = {"stage": int(ds.zero_stage)}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return zero


def derived_config(spec: Spec, world_size: int) -> dict[str, Any]:
    """The keys koe5 derives from the spec, before `deepspeed.extra` is merged."""
    t = spec.train
    return {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        # GradCache calls backward once per replayed chunk, a number that varies with chunking. In unmanaged
        # mode step() is the one accumulation boundary: ZeRO 0/1 reduce once there, ZeRO 2/3 finalize the
        # partitions they reduced chunk by chunk. No "Gradient computed twice" and no per-chunk all-reduce.
        "managed_gradient_accumulation": False,
        # float32 ZeRO-0 hands the torch optimizer through unwrapped and discards the gradient norm; there the
        # trainer clips in a pre-step hook (koe5/train/trainer.py) so the norm can be logged.
        "gradient_clipping": 0.0 if trainer_clips(spec) else float(t.grad_clip or 0.0),
        "zero_optimization": zero_config(spec),
        # koe5 passes a torch AdamW; with offload DeepSpeed would otherwise insist on its compiled CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        # bf16 is koe5's autocast over float32 weights (koe5/train/step.py), not DeepSpeed's bf16 mode: there
        # GradCache's many backward calls per step summed their gradients in bf16 (ZeRO-0's unfused optimizer,
        # ZeRO-2's bf16 buffer), and DeepSpeed has no fp32 accumulation for bf16 at ZeRO-0. With float32
        # weights every ZeRO stage accumulates in float32 and the export takes the master weights.
        "bf16": {"enabled": False},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,  # koe5 logs its own diagnostics
        "wall_clock_breakdown": False,
    }


def conflicts(derived: dict, extra: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(key path, derived value, raw value) for every raw key that contradicts a derived one."""
    found = []
    for key, raw in extra.items():
        if key not in derived:
            continue
        here = f"{prefix}.{key}" if prefix else key
        if isinstance(raw, dict) and isinstance(derived[key], dict):
            found += conflicts(derived[key], raw, here)
        elif raw != derived[key]:
            found.append((here, derived[key], raw))
    return found


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(spec: Spec, world_size: int) -> dict[str, Any]:
    """The materialized DeepSpeed config for `world_size` ranks. Validation rejects conflicting extras
    earlier; this raises ValueError as a last line of defence."""
    derived = derived_config(spec, world_size)
    bad = conflicts(derived, spec.deepspeed.extra)
    if bad:
        path, want, got = bad[0]
        raise ValueError(f"deepspeed.extra.{path}={got!r} contradicts the value derived from the spec ({want!r})")
    return merge(derived, spec.deepspeed.extra)
