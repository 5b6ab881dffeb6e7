"""Real browser: `streamlit run` headless on a free port, rendered by headless Chromium.

Checks that a run's name appears in the rendered page and keeps a screenshot under
$KOE5_TEST_ARTIFACTS (default tests/artifacts/, git-ignored). Needs Debian's `chromium` package.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from koe5.registry.demo import make_demo_registry

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} is missing: `apt-get install -y chromium` to run the browser check")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium(url: str, profile: Path, *mode: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=30000",
             "--window-size=1400,1000"]
    return subprocess.run([CHROMIUM, *flags, *mode, url], capture_output=True, text=True, timeout=120)


@pytest.fixture
def server(tmp_path):
    ids = make_demo_registry(tmp_path / "reg.duckdb")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO / "dashboards" / "leaderboard.py"),
         "--server.headless=true", f"--server.port={port}", "--server.address=127.0.0.1",
         "--browser.gatherUsageStats=false", "--", "--registry", str(tmp_path / "reg.duckdb")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "streamlit did not become healthy within 60 s"
            time.sleep(0.5)
        yield url, ids
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_leaderboard_renders_in_chromium(server, tmp_path):
    url, ids = server
    artifacts = Path(os.environ.get("KOE5_TEST_ARTIFACTS", REPO / "tests" / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)

    # The page is rendered by JavaScript over a websocket; retry a few times in case the first load is slow.
    # st.dataframe draws its cells on a canvas, so the name found in the DOM is the "Best by" line's.
    # On a loaded machine (the whole suite running) the first loads can time out, so allow a few.
    for attempt in range(6):
        dom = chromium(url, tmp_path / f"profile-dom-{attempt}", "--dump-dom")
        if "e5-small-ko-ft" in dom.stdout:
            break
        time.sleep(2)
    assert "e5-small-ko-ft" in dom.stdout, f"run name not in the rendered page; chromium stderr:\n{dom.stderr[-2000:]}"
    assert "koe5 leaderboard" in dom.stdout

    # A blank or still-loading page is a few KB; the rendered table is well over 10 KB. Retry under load.
    shot = tmp_path / "leaderboard.png"
    for attempt in range(5):
        result = chromium(url, tmp_path / f"profile-shot-{attempt}", f"--screenshot={shot}")
        if shot.exists() and shot.stat().st_size > 10_000:
            break
        time.sleep(2)
    assert shot.exists() and shot.stat().st_size > 10_000, result.stderr[-2000:]
    shutil.copy(shot, artifacts / "leaderboard.png")
