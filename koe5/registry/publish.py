"""`koe5 export RUN --push-to-hub NAME`: upload a run's exported model directory to the Hugging Face hub.

What is sent is exactly `model_files(model_dir)`: the files `koe5.export.export_model` wrote (weights,
config, tokenizer, sentence-transformers modules and prompts, README.md model card). Training state never
lives there (checkpoints are in the run directory's checkpoints/), and hidden files or anything that looks
like a checkpoint or optimizer state is left out all the same. `--dry-run` lists those files and sizes and
the repo id without touching the network.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from pathlib import Path

from koe5.registry.connect import RegistryError

# Never uploaded, should they ever appear in a model directory: training state and local tool caches.
LEFT_OUT = ("checkpoints/*", "global_step*", "*optim*", "rng-*", "latest", "latest.json", "*.pt", "*.ckpt",
            "zero_to_fp32.py", "trainer_state.json", "training_args.bin")


class PublishError(RegistryError):
    """A push that cannot happen; the message says why and what to do, in one line."""


def run_model_dir(run: dict) -> Path:
    """The model directory a finished training run recorded (its `model` artifact)."""
    paths = [a["path"] for a in run["artifacts"] if a["kind"] == "model"]
    if not paths:
        raise PublishError(f"Run {run['run_id']} ({run['name']}, {run['kind']}, {run['status']}) has no exported "
                           "model: only a training run that finished has one.")
    path = Path(paths[-1])
    if not (path / "config.json").is_file():
        raise PublishError(f"Run {run['run_id']}: its model directory {path} is missing or has no config.json.")
    return path


def model_files(model_dir: str | Path) -> list[tuple[str, int]]:
    """(path relative to the directory, size in bytes) of every file that would be uploaded, sorted."""
    root = Path(model_dir)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if name.startswith(".") or any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in LEFT_OUT):
                continue
            out.append((rel, (Path(dirpath) / name).stat().st_size))
    return sorted(out)


def left_out_files(model_dir: str | Path) -> list[str]:
    """Files in the directory that `model_files` does not send (hidden files, training state)."""
    root = Path(model_dir)
    sent = {rel for rel, _ in model_files(root)}
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.relative_to(root).as_posix() not in sent)


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def push(model_dir: Path, repo_id: str, files: list[tuple[str, int]], *, private: bool, message: str) -> str:
    """Create (or reuse) the model repo and upload `files` from `model_dir` in one commit; returns the
    commit URL. Every failure (no token, no network, refused) becomes one PublishError line."""
    import huggingface_hub
    from huggingface_hub import HfApi

    if not huggingface_hub.get_token():
        raise PublishError("No Hugging Face token: log in with `hf auth login` or set HF_TOKEN, then push again "
                           "(`--dry-run` shows what would be sent).")
    api = HfApi()
    try:
        repo = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo.repo_id, repo_type="model", folder_path=str(model_dir),
                                   allow_patterns=[glob.escape(rel) for rel, _ in files],
                                   commit_message=message)
    except Exception as e:  # the hub client raises many types (offline, HTTP, auth, validation)
        first = (str(e).strip().splitlines() or [""])[0]
        raise PublishError(f"Could not push to the Hugging Face hub repo {repo_id!r}: {type(e).__name__}: {first}"
                           ) from None
    return str(getattr(commit, "commit_url", commit))
