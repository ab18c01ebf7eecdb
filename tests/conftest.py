"""Shared fixtures: a local image server and a local S3 server (moto), both on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from imageserver import ImageServer  # noqa: E402


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    """A fresh image server per test (its flaky switch, hold event and hit counts start clean)."""
    server = ImageServer(slow_s=4.0).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class S3Server:
    """A running moto S3 server: its endpoint and the fsspec options that reach it."""

    endpoint_url: str

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url, "key": "testing", "secret": "testing",
                "client_kwargs": {"region_name": "us-east-1"}}

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (idempotent) and return its URL 's3://name'."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 for the whole session; `make_bucket(name)` gives 's3://name'."""
    from moto.server import ThreadedMotoServer

    for var, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(var, value)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Server(endpoint_url=f"http://127.0.0.1:{port}")
    finally:
        server.stop()


from tests.slurm_cluster import slurm_cluster  # noqa: E402,F401 - the one-node SLURM cluster (session fixture)
