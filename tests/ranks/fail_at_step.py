"""A training rank whose data fails while building the batch of step $KOE5_FAIL_AT_STEP, with a DataError
naming a file and line as a bad record's does, so a test can check how the trainer reports an error raised
where batches are built (with data.prefetch, in the background thread; tests/test_prefetch.py). Nothing
else changes: the trainer's own loop and error handling run."""

import os
import sys

from koe5.data.dataset import TrainingData
from koe5.data.errors import DataError

FAIL_AT = int(os.environ["KOE5_FAIL_AT_STEP"])
real_global_batch = TrainingData.global_batch


def failing_global_batch(self, step):
    if step == FAIL_AT:
        raise DataError(f"{self.spec.data.sources[0].path}:3: field 'query': expected a string, found a number")
    return real_global_batch(self, step)


TrainingData.global_batch = failing_global_batch

if __name__ == "__main__":
    from koe5.train.__main__ import main

    sys.exit(main(sys.argv[1:]))
