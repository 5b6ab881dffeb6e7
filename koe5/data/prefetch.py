"""Build the next batches in a background thread while the current step trains (`data.prefetch`).

    with Prefetcher(make, range(first_step, total_steps), ahead=2) as items:
        for item in items:      # make(step) for each step, in order
            ...

`make(step)` does the host work of a step (the global batch, its rank slice, padding; see
koe5/train/trainer.py); with `ahead` > 0 one thread runs it up to `ahead` steps before the loop needs it.
The items are the same, in the same order, as calling `make` in the loop (ahead = 0 does exactly that):
`make` is a pure function of the step (koe5/data/dataset.py) and draws from no global random generator, so
running it early changes nothing the training sees, and a resume starts the thread at the resumed step.

An exception in `make` (a DataError naming file:line, say) is raised in the loop, unchanged, when the loop
reaches that step; leaving the `with` block (the loop finished, broke off early or raised) stops the thread
and waits for it, so no thread outlives the loop.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()  # the producer has made every item


class Prefetcher(Generic[T]):
    def __init__(self, make: Callable[[int], T], steps: Iterable[int], ahead: int):
        if ahead < 0:
            raise ValueError(f"ahead must be >= 0, got {ahead}")
        self.make, self.steps, self.ahead = make, steps, ahead
        self._queue: queue.Queue = queue.Queue(maxsize=max(ahead, 1))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Iterator[T]:
        if self.ahead == 0:  # today's serial path: build each batch when the loop asks for it
            return (self.make(step) for step in self.steps)
        self._thread = threading.Thread(target=self._produce, name="koe5-prefetch", daemon=True)
        self._thread.start()
        return self._consume()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue) and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _put(self, item) -> bool:
        """Put `item`, waking every 0.1 s to see whether the loop has gone; False if it has."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for step in self.steps:
                if not self._put((self.make(step), None)):
                    return
            self._put((_DONE, None))
        except BaseException as e:  # handed to the loop, which raises it where the serial path would
            self._put((None, e))

    def _consume(self) -> Iterator[T]:
        while True:
            item, error = self._queue.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
