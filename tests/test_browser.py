"""Headless Chromium loads the served app and takes a screenshot of the rendered page."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_page_renders_in_headless_chromium(served, tmp_path):  # noqa: F811
    client, *_ = served
    shot = tmp_path / "app.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,900",
           "--virtual-time-budget=8000", client.src]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"no screenshot; chromium exited {run.returncode}: {run.stderr[-2000:]}"
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    # a blank or still-loading page is one or two flat colours; the rendered app has text, widgets, a table
    assert len(colours) > 200 and counts.max() / len(pixels) < 0.85, (len(colours), counts.max() / len(pixels))
