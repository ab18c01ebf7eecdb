"""Shared fixtures: real local services (S3) started on 127.0.0.1 and stopped by pid."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """A moto S3 server on 127.0.0.1 (a real HTTP S3 endpoint)."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.storage_options = {
            "key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        }

    def make_bucket(self, name: str | None = None) -> str:
        import boto3

        name = name or f"b-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server():
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("moto S3 server did not start")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    yield S3Server(endpoint)
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


# -- the image server for download tests ------------------------------------------------------
sys.path.insert(0, os.path.dirname(__file__))

from imageserver import ImageServer  # noqa: E402


@pytest.fixture
def image_server():
    """A fresh local image server per test (tests/imageserver.py): its flaky switch, hold event and hit
    counts start clean."""
    server = ImageServer(slow_s=4.0).start()
    try:
        yield server
    finally:
        server.stop()
