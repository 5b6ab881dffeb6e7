"""Every shipped experiment spec validates (as a dry run: specs such as koe5-large are meant for GPU
machines with their own data, so devices and paths of this machine are only warnings there)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "experiments").glob("*.yaml"))


def dry_run(spec: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    # A bare environment: the specs' ${env:...} defaults are what is checked, whatever the caller exported.
    return subprocess.run([sys.executable, "-m", "koe5.run", str(spec), "--dry-run", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KOE5_REGISTRY": str(tmp_path / "r"),
                               **env})


@pytest.mark.parametrize("spec", SPECS, ids=[s.stem for s in SPECS])
def test_experiment_dry_run_validates(spec, tmp_path):
    proc = dry_run(spec, tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["spec_hash"]) == 16 and "Traceback" not in proc.stderr


def test_koe5_large_is_the_original_recipe(tmp_path):
    spec = json.loads(dry_run(ROOT / "experiments" / "koe5-large.yaml", tmp_path).stdout)["spec"]
    assert spec["model"]["name_or_path"] == "intfloat/multilingual-e5-large"
    assert (spec["train"]["batch_size"], spec["cache"]["chunk_size"], spec["train"]["lr"]) == (512, 32, 1e-5)
    assert (spec["train"]["epochs"], spec["train"]["warmup_ratio"], spec["train"]["precision"]) == (1, 0.1, "bf16")
    assert spec["loss"]["temperature"] == 0.02 and spec["launch"]["nproc_per_node"] == 8
    assert [b["name"] for b in spec["eval"]["benchmarks"]] == ["ko-strategyqa", "autorag", "publichealthqa"]


def test_me5_small_strategyqa_takes_the_model_from_the_environment_and_the_data_from_beside_the_repo(tmp_path):
    proc = dry_run(ROOT / "experiments" / "me5-small-strategyqa.yaml", tmp_path, KOE5_ME5_SMALL=str(tmp_path / "me5"))
    spec = json.loads(proc.stdout)["spec"]
    assert spec["model"]["name_or_path"] == str(tmp_path / "me5")
    # Relative paths resolve from the spec file, so ../../shared is the checkout's sibling `shared/`.
    shared = ROOT.parent / "shared" / "data" / "strategyqa_ko"
    assert [Path(s["path"]) for s in spec["data"]["sources"]] == [shared / "train.jsonl",
                                                                 ROOT / "koe5" / "assets" / "ko_sample" / "train.jsonl"]
    assert [Path(b["path"]) for b in spec["eval"]["benchmarks"]] == [shared / "dev",
                                                                     ROOT / "koe5" / "assets" / "ko_sample" / "bench"]


def test_me5_small_ko_reads_the_published_korean_folders_and_holds_out_its_dev_benchmarks(tmp_path):
    """Issue 20's recipe: at least four ko_public folders read in their published formats, the two holdout
    sources on their training side, evaluated on the other side (built by `koe5 data bench`) and the base."""
    proc = dry_run(ROOT / "experiments" / "me5-small-ko.yaml", tmp_path, KOE5_KO_PUBLIC=str(tmp_path / "ko"),
                   KOE5_DEVBENCH=str(tmp_path / "bench"))
    assert proc.returncode == 0, proc.stderr
    spec = json.loads(proc.stdout)["spec"]
    sources = {s["name"]: s for s in spec["data"]["sources"]}
    folders = {Path(s["path"]).parent.name for s in sources.values() if Path(s["path"]).is_relative_to(tmp_path / "ko")}
    assert len(folders) >= 4, folders
    assert sources["korquad"]["format"] == "squad" and sources["klue-nli"]["encoding"] == "cp949"
    assert sources["question-pair"]["labels"] == {"positive": ["0"], "negative": ["1"]}
    for name in ("korquad", "msmarco-ko"):
        assert sources[name]["holdout"]["side"] == "train" and sources[name]["holdout"]["fraction"] > 0
    assert sources["msmarco-ko"]["mine"]["negatives"] > 0
    benches = {b["name"]: Path(b["path"]) for b in spec["eval"]["benchmarks"]}
    assert benches["korquad-dev"] == tmp_path / "bench" / "korquad-dev"
    assert benches["msmarco-ko-dev"] == tmp_path / "bench" / "msmarco-ko-dev"
    assert spec["eval"]["baseline"] is True
