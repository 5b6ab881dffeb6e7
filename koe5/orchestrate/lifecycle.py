"""A run's life in the registry while its ranks train, written only by the orchestrator (ranks never open
the registry): the heartbeat that tells readers the run is alive, SIGTERM/Ctrl-C turned into an orderly
`killed`, and the ranks' outputs (training log, data mix) folded into the run's rows."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

HEARTBEAT_S = float(os.environ.get("KOE5_HEARTBEAT_S", "10"))


class Heartbeat(threading.Thread):
    """Tells the registry this run is alive and folds new training-log and eval-log rows in, every few seconds.
    A run whose heartbeat stops (SIGKILL, power loss) shows as `crashed` to readers."""

    def __init__(self, registry, run_id: str, log_path: Path):
        super().__init__(daemon=True)
        self.registry, self.run_id, self.log_path = registry, run_id, log_path
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(HEARTBEAT_S):
            try:
                self.registry.heartbeat(self.run_id)
                if self.log_path.exists():
                    self.registry.fold_train_log(self.run_id, self.log_path)
                eval_log = self.log_path.parent / "eval_log.jsonl"  # evaluations during training (eval.every)
                if eval_log.exists():
                    self.registry.fold_eval_log(self.run_id, eval_log)
            except Exception as e:  # a busy registry must never stop training
                print(f"koe5-run: heartbeat skipped ({e})", file=sys.stderr)

    def stop(self) -> None:
        """Stop and wait for any registry write in progress: a daemon thread still inside DuckDB when the
        interpreter shuts down aborts the process ("FATAL: exception not rethrown", exit -6)."""
        self.stopped.set()
        if self.is_alive():
            self.join()


class Killed(Exception):
    """SIGTERM or SIGINT arrived; the run is recorded as `killed` with the signal's name."""


# The signal that arrived, also kept here because the exception the handler raises can be lost: Python runs
# the handler wherever the main thread happens to be, and code such as an at-fork callback (subprocess's fork
# runs logging's) reports an exception raised inside it as "Exception ignored" and carries on.
_received: list[str] = []


def _raise_killed(signum, frame):
    _received.append(signal.Signals(signum).name)
    raise Killed(f"received {_received[-1]}")


def raise_if_killed() -> None:
    """Raise `Killed` if a signal arrived whose exception was swallowed; long waits call this as they poll."""
    if _received:
        raise Killed(f"received {_received[-1]}")


@contextmanager
def signals_raise_killed():
    """Within the block, SIGTERM and SIGINT raise `Killed` (so the orchestrator records why it stopped);
    the previous handlers come back afterwards."""
    _received.clear()
    previous = {s: signal.signal(s, _raise_killed) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def fold_outputs(registry, run_id: str, run_dir: Path) -> None:
    """Fold what the ranks wrote into the run's rows: the training log, the evaluations during training,
    the training summary (steps, seconds, evaluation seconds, best step, early stop) and the data mix (with
    the orchestrator's own data checks beside what was drawn)."""
    log = run_dir / "train_log.jsonl"
    if log.exists():
        registry.fold_train_log(run_id, log)
    eval_log = run_dir / "eval_log.jsonl"
    if eval_log.exists():
        registry.fold_eval_log(run_id, eval_log)
    summary = run_dir / "train_summary.json"
    if summary.exists():
        registry.set_train_summary(run_id, json.loads(summary.read_text()))
    mix = run_dir / "data_mix.json"
    checks = run_dir / "data_checks.json"
    if mix.exists():
        data_mix = json.loads(mix.read_text())
        if checks.exists():  # what the sources hold and the leakage found, beside what was drawn
            data_mix["_checks"] = json.loads(checks.read_text())
        registry.set_data_mix(run_id, data_mix)
