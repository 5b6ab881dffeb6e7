"""Entry point of one training rank: `python -m koe5.train --spec FROZEN.yaml --run-dir DIR`.

Launchers (koe5/launch.py) start one of these per rank. Every rank reads the same frozen, fully
resolved spec file; nothing is re-composed here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m koe5.train")
    parser.add_argument("--spec", required=True, help="frozen resolved spec written by koe5-run")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by some launchers
    args = parser.parse_args(argv)

    from koe5.data.triples import DataError
    from koe5.spec import load_frozen
    from koe5.train.checkpoint import CheckpointError
    from koe5.train.step import NonFiniteLoss
    from koe5.train.trainer import train

    run_dir = Path(args.run_dir)
    resolved = load_frozen(args.spec)
    try:
        train(resolved.spec, resolved.to_yaml(), run_dir, resolved.spec_hash)
    except (DataError, CheckpointError) as e:
        return _fail(run_dir, str(e), EXIT_BAD_INPUT)
    except NonFiniteLoss as e:
        return _fail(run_dir, str(e), EXIT_NON_FINITE)
    finally:
        # Exiting with a live process group (ZeRO-2's communication state) can abort the interpreter.
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _fail(run_dir: Path, message: str, status: int) -> int:
    # The orchestrator records this text as the run's error.
    print(f"koe5: {message}", file=sys.stderr)
    (run_dir / "error.txt").write_text(message + "\n", encoding="utf-8")
    return status


if __name__ == "__main__":
    status = main()
    # The work is done and written; skip the interpreter's teardown, where DeepSpeed's ZeRO-3/offload helper
    # threads can abort the process ("terminate called without an active exception") and turn a finished
    # rank into a failed one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
