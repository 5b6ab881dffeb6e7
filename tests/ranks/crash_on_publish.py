"""A one-process training run that dies (exit 9) right after writing checkpoint $KOE5_CRASH_AT and before
publishing it: tests/test_resume.py uses it to interrupt a checkpoint write halfway."""

import os
import sys

from koe5.train import checkpoint

real_publish = checkpoint._publish


def dying_publish(root, written, tag):
    if tag == os.environ["KOE5_CRASH_AT"]:
        os._exit(9)
    real_publish(root, written, tag)


checkpoint._publish = dying_publish

if __name__ == "__main__":
    from koe5.train.__main__ import main

    sys.exit(main(sys.argv[1:]))
