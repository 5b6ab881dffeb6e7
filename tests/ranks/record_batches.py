"""A training rank that appends every global batch the trainer draws to $KOE5_RECORD_BATCHES, one JSON line
each ({"step": the argument, "batch": [(source, row, positive, negatives), ...]}), in the order drawn, so a
test can compare what a resumed run really trains on with what an uninterrupted run does
(tests/test_data_batches.py). Nothing else changes: the trainer's own loop, checkpoint and resume path run."""

import json
import os
import sys

from koe5.data.dataset import TrainingData

OUT = os.environ["KOE5_RECORD_BATCHES"]
real_global_batch = TrainingData.global_batch


def recording_global_batch(self, step):
    batch = real_global_batch(self, step)
    rows = [[s, r, p, n] for (s, r), p, n in zip(batch.ids(), batch.positive.tolist(), batch.negatives.tolist())]
    with open(OUT, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": int(step), "batch": rows}) + "\n")
    return batch


TrainingData.global_batch = recording_global_batch

if __name__ == "__main__":
    from koe5.train.__main__ import main

    sys.exit(main(sys.argv[1:]))
