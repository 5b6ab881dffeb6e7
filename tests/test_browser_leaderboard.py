"""Real browser: `streamlit run` headless on a free port, rendered by Debian's headless Chromium driven
by Playwright (which waits for the page's JavaScript and websocket to deliver the content, however slow
the machine is). Checks that a run's name appears in the rendered page and keeps a screenshot under
$KOE5_TEST_ARTIFACTS (default tests/artifacts/, git-ignored).
"""

from __future__ import annotations

import os
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
    from playwright.sync_api import sync_playwright

    url, ids = server
    artifacts = Path(os.environ.get("KOE5_TEST_ARTIFACTS", REPO / "tests" / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            # st.dataframe draws its cells on a canvas, so the name looked for is the "Best by" line's.
            page.get_by_text("e5-small-ko-ft").first.wait_for(timeout=120_000)
            assert "koe5 leaderboard" in page.content()
            page.screenshot(path=str(artifacts / "leaderboard.png"))
        finally:
            browser.close()
    assert (artifacts / "leaderboard.png").stat().st_size > 10_000
