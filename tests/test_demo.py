"""The README's first command: `make demo` runs scripts/demo.py (train a tiny student, export an int8
bundle, serve it over HTTP, score the held-out benchmark through the server)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.heavy
def test_demo_runs_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "student int8 bundle over HTTP" in r.stdout and "HTTP latency per request" in r.stdout
    assert "server metrics: " in r.stdout
