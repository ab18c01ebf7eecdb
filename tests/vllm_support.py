"""Test support for the vllm-cpu virtualenv: its python, its environment, and a `vllm serve` to start and stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("VLLM_VENV", REPO / ".venv-vllm"))
VENV_PY = VENV / "bin" / "python"


def vllm_env() -> dict[str, str]:
    """The environment for the venv's python: the repo on the path, one process, a small CPU KV cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHONHOME"))}
    env.update(PYTHONPATH=str(REPO), VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_LOGGING_LEVEL="WARNING", PYTHONUNBUFFERED="1", SOURCE_DATE_EPOCH="1700000000")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: Path, port: int, log: Path, max_model_len: int = 1024, mm_pixels: int | None = None) -> subprocess.Popen:
    """Start `vllm serve` (through its module entry point: the distribution is named vllm-cpu) on 127.0.0.1."""
    cmd = [str(VENV_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", str(max_model_len), "--enforce-eager",
           "--seed", "0"]
    if mm_pixels:
        cmd += ["--limit-mm-per-prompt", json.dumps({"image": 1}),
                "--mm-processor-kwargs", json.dumps({"size": {"shortest_edge": mm_pixels, "longest_edge": mm_pixels}})]
    with log.open("a") as fh:
        return subprocess.Popen(cmd, env=vllm_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def wait_up(proc: subprocess.Popen, url: str, log: Path, timeout: float = 420) -> None:
    """Wait until the server lists its models; fail the test with the log's tail if it dies or hangs."""
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            pytest.fail(f"vllm serve did not come up in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(2)


def stop(proc: subprocess.Popen) -> None:
    """Kill the server and its children."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
