"""A short smoke of the chaos benchmark (tools/chaos.py): two trials with a fixed seed on one shard of the demo
world, a local root and an s3 root (moto), each killed at a random moment and rerun clean: nothing lost,
duplicated, corrupt or left behind (about 35 s on an idle 2-core machine). The 100-trial runs are in
docs/benchmarks.md."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.resources import REPO_ROOT


@pytest.mark.slow
def test_chaos_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "tools/chaos.py", "--trials", "2", "--seed", "7", "--images", "20",
                           "--s3", "moto", "--work", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=900)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines[-1] == "trials=2 lost=0 duplicated=0 corrupt=0 orphans=0", \
        proc.stdout[-3000:] + proc.stderr[-3000:]
