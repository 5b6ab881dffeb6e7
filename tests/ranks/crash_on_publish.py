"""A one-process training run that dies (exit 9) while publishing checkpoint $KOE5_CRASH_AT, at the point
$KOE5_CRASH_POINT names; tests/test_resume.py and tests/test_checkpoint_publish.py use it:
    before_publish (the default)  its files are written into .partial/, nothing is published yet
    after_rename                  step-N has been renamed into place, latest.json still names the previous one
os._exit, so no cleanup (finally, atexit) runs: what is left on disk is what a killed machine leaves."""

import json
import os
import sys
from pathlib import Path

from koe5.train import checkpoint

CRASH_AT = os.environ["KOE5_CRASH_AT"]
POINT = os.environ.get("KOE5_CRASH_POINT", "before_publish")
if POINT not in ("before_publish", "after_rename"):
    raise SystemExit(f"KOE5_CRASH_POINT={POINT!r}: expected before_publish or after_rename")

real_publish = checkpoint._publish
real_replace = os.replace


def dying_publish(root, written, tag):
    if tag == CRASH_AT:
        os._exit(9)
    real_publish(root, written, tag)


def dying_replace(src, dst, *args, **kwargs):
    """latest.json is replaced by os.replace of a temporary file holding the new tag: die just before."""
    if Path(dst).name == checkpoint.LATEST and json.loads(Path(src).read_text())["tag"] == CRASH_AT:
        assert (Path(dst).parent / CRASH_AT / "koe5.json").exists()  # the rename happened
        os._exit(9)
    real_replace(src, dst, *args, **kwargs)


if POINT == "before_publish":
    checkpoint._publish = dying_publish
else:
    os.replace = dying_replace  # checkpoint.py calls os.replace through the module, so this reaches it

if __name__ == "__main__":
    from koe5.train.__main__ import main

    sys.exit(main(sys.argv[1:]))
