"""No secret on disk: the one redaction rule (pipeline/redact.py), secrets kept out of sbatch scripts and
submission records, openai model ids without credentials, and a small run with a planted secret in every place a
user can put one, after which no file under the root (logs included) and no printed line holds any of them."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main
from pipeline.config import EngineConfig
from pipeline.demo import DEMO_MANIFEST, make_demo_data, serve_directory
from pipeline.engines import ChatRequest, Sampling, create_engine
from pipeline.executors.base import SECRET_SETTINGS_ENV
from pipeline.redact import (
    MASK,
    is_secret_name,
    is_secret_override,
    redact,
    redact_override,
    redact_text,
    redact_url,
)
from tests.test_engine_openai import ScriptedServer

# -- the rule ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("url, hidden, kept", [
    ("http://user:pw123@host:8000/v1", ["pw123"], ["user", "host:8000/v1"]),
    ("http://tok999@host/v1", ["tok999"], ["host/v1"]),
    ("https://b.s3.amazonaws.com/l.parquet?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc",
     ["AKIA", "abc"], ["X-Amz-Algorithm=AWS4", "l.parquet"]),
    ("http://h/v1?api_key=k1&mode=x", ["k1"], ["mode=x"]),
    ("https://acct.blob.core.windows.net/c/f.csv?sv=2020&sig=s1g", ["s1g"], ["sv=2020"]),
    ("https://h/f.txt?token=t0k", ["t0k"], ["f.txt"]),
])
def test_redact_url_masks_credentials_only(url, hidden, kept):
    out = redact_url(url)
    assert all(h not in out for h in hidden), out
    assert all(k in out for k in kept), out
    assert MASK in out


def test_plain_urls_and_names_pass_unchanged():
    for url in ("s3://bucket/run", "http://127.0.0.1:8000/v1", "https://h/f.parquet?version=3"):
        assert redact_url(url) == url
    assert [n for n in ("secret", "key", "token", "password", "api_key", "aws_secret_access_key", "sig",
                        "X-Amz-Security-Token", "client_secret") if not is_secret_name(n)] == []
    assert [n for n in ("api_key_env", "endpoint_url", "key_id", "url_col", "anon", "region_name", "mode")
            if is_secret_name(n)] == []


def test_redact_mappings_overrides_and_text():
    opts = {"key": "AK", "secret": "SK", "client_kwargs": {"endpoint_url": "http://u:p4ss@h"}, "anon": False}
    assert redact(opts) == {"key": MASK, "secret": MASK, "client_kwargs": {"endpoint_url": f"http://u:{MASK}@h"},
                            "anon": False}
    assert redact_override("storage_options.secret=XYZ") == f"storage_options.secret={MASK}"
    assert redact_override("annotate.captioner.batch_size=16") == "annotate.captioner.batch_size=16"
    assert is_secret_override("annotate.captioner.base_url=http://a:b@h/v1")
    assert not is_secret_override("annotate.captioner.base_url=http://h/v1")
    assert redact_text("GET http://a:b@h/v1/models failed") == f"GET http://a:{MASK}@h/v1/models failed"


# -- the openai engine --------------------------------------------------------------------------------


def test_openai_model_id_has_no_credentials_and_requests_still_work():
    server = ScriptedServer()
    try:
        host = server.url.removeprefix("http://")
        engine = create_engine(EngineConfig(backend="openai", base_url=f"http://bob:pw-123@{host}?api_key=k-456",
                                            model="m", timeout_s=5.0, max_retries=0))
        assert engine.model_id == f"openai:http://{host}/m"
        [[gen]] = engine.generate([ChatRequest(messages=[{"role": "user", "content": "hi"}])], Sampling())
        assert gen.error is None and gen.text == " hi #0"
    finally:
        server.close()


def test_dead_openai_server_names_url_and_connection_error():
    engine = create_engine(EngineConfig(backend="openai", base_url="http://u:pw-789@127.0.0.1:9/v1", model="m",
                                        max_retries=0, timeout_s=2.0))
    [[gen]] = engine.generate([ChatRequest(messages=[{"role": "user", "content": "a"}])], Sampling())
    assert "cannot reach http://127.0.0.1:9/v1/chat/completions: ConnectError: " in gen.error
    assert not gen.error.rstrip().endswith(":") and "pw-789" not in gen.error


# -- submit: secrets reach the tasks through the environment -----------------------------------------------


def fake_sbatch(bin_dir: Path, seen: Path, rc: int = 0) -> None:
    """An `sbatch` that records the secret settings it was handed (outside the root) and answers a job id."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "sbatch"
    script.write_text("#!/bin/bash\n"
                      f'printf "%s" "${{{SECRET_SETTINGS_ENV}:-}}" > {seen}\n'
                      + ('echo "sbatch: error: Batch job submission failed: Invalid account" >&2; exit 1\n' if rc
                         else 'echo "4242"\n'))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_submit_keeps_secrets_out_of_script_and_record(tmp_path, monkeypatch, capsys):
    root = tmp_path / "root"
    seen = tmp_path / "seen.txt"
    fake_sbatch(tmp_path / "bin", seen)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    args = ["submit", "--stage", "annotate", "--shards", "0-1", "--root", str(root),
            "--set", "storage_options.secret=S3CRET-1", "--set", "annotate.captioner.backend=noop",
            "--set", "annotate.captioner.base_url=http://u:S3CRET-2@h/v1"]
    assert main(args) == 0
    scripts = list((root / "logs").glob("*/job.sbatch"))
    records = list((root / "logs").glob("*/submission.json"))
    assert len(scripts) == 1 and len(records) == 1
    text = scripts[0].read_text() + records[0].read_text() + capsys.readouterr().out
    assert "S3CRET" not in text
    assert f"${SECRET_SETTINGS_ENV}" in scripts[0].read_text()  # the script says where they come from
    assert json.loads(seen.read_text()) == ["storage_options.secret=S3CRET-1",
                                            "annotate.captioner.base_url=http://u:S3CRET-2@h/v1"]
    assert "--gres" not in scripts[0].read_text()  # a noop captioner needs no GPU


def test_refused_submission_leaves_no_script(tmp_path, monkeypatch, capsys):
    root = tmp_path / "root"
    fake_sbatch(tmp_path / "bin", tmp_path / "seen.txt", rc=1)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert main(["submit", "--stage", "download", "--shards", "0", "--root", str(root),
                 "--set", "storage_options.token=S3CRET-3"]) == 2
    err = capsys.readouterr().err
    assert "Invalid account" in err and "S3CRET" not in err
    assert [p.name for p in (root / "logs").iterdir()] == [] if (root / "logs").exists() else True


def test_task_reads_secret_settings_from_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(SECRET_SETTINGS_ENV, json.dumps(["annotate.captioner.noop_text=from-env"]))
    from pipeline import cli

    args = cli.build_parser().parse_args(["status", "--root", str(tmp_path)])
    assert cli._config(args).annotate.captioner.noop_text == "from-env"
    monkeypatch.setenv(SECRET_SETTINGS_ENV, "not json")
    assert main(["status", "--root", str(tmp_path)]) == 2
    assert "error: $PIPELINE_SECRET_SETTINGS is not a JSON list" in capsys.readouterr().err


# -- a small run with a secret planted in every place ------------------------------------------------------

PLANTED = {
    "storage": "PLANTED-storage-secret-41",
    "password": "PLANTED-basic-password-42",
    "api_key": "PLANTED-query-api-key-43",
    "signature": "PLANTED-amz-signature-44",
    "list_token": "PLANTED-list-token-45",
}


def _grep(root: Path, needles: list[str]) -> list[str]:
    hits = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            blob = path.read_bytes()
            hits += [f"{path.relative_to(root)}: {n}" for n in needles if n.encode() in blob]
    return hits


def test_run_with_planted_secrets_leaves_none_on_disk(tmp_path, monkeypatch, capsys):
    data = make_demo_data(tmp_path / "data", n_images=6, size=48)
    root = tmp_path / "root"
    server = ScriptedServer()
    host = server.url.removeprefix("http://")
    base_url = f"http://bob:{PLANTED['password']}@{host}?api_key={PLANTED['api_key']}"
    fake_sbatch(tmp_path / "bin", tmp_path / "seen.txt")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    try:
        with serve_directory(data) as served:
            rows = [{"url": f"{served}/{r['file']}?token=DATA-token-in-the-users-urls", "scene_id": r["scene_id"]}
                    for r in pq.read_table(data / "world.parquet").to_pylist()]
            pq.write_table(pa.Table.from_pylist(rows), data / "signed.parquet")
            list_url = (f"{served}/signed.parquet?X-Amz-Signature={PLANTED['signature']}"
                        f"&token={PLANTED['list_token']}")
            download = yaml.safe_load(DEMO_MANIFEST.read_text())["download"]
            download.update(urls=list_url, input_format="parquet", save_additional_columns=["scene_id"],
                            caption_col=None, image_size=48)
            engine = {"backend": "openai", "base_url": base_url, "model": "scripted-model", "timeout_s": 10,
                      "concurrency": 4, "max_retries": 0}
            manifest = tmp_path / "m.yaml"
            manifest.write_text(yaml.safe_dump({
                "name": "secrets", "root": str(root), "shard_size": 3, "download": download,
                "annotate": {"captioner": engine, "sampling": {"max_new_tokens": 16}},
                "evaluate": {"name": "srv", "k": 1, "captioners": {"srv": engine}, "baselines": ["empty"],
                             "reader": engine, "answer_mode": "generate",
                             "benchmarks": [{"name": "h", "kind": "jsonl", "limit": 3,
                                             "path": str(data / "heldout" / "benchmark.jsonl")}]},
            }))
            common = ["-m", str(manifest), "--set", f"storage_options.secret={PLANTED['storage']}"]
            for stage in ("download", "annotate"):
                assert main(["run", "--stage", stage, "--shards", "0-1", "--no-progress", *common]) == 0, stage
            assert main(["run", "--stage", "evaluate", "--no-progress", *common]) == 0
            assert main(["submit", "--stage", "annotate", "--shards", "0-1", *common]) == 0
            assert main(["status", *common]) == 0
            assert main(["verify", *common]) == 0
            assert main(["browse", str(root), "--html", str(root / "gallery"), *common]) == 0
            assert main(["run", "--stage", "annotate", "--shards", "5", "--no-progress", *common]) == 2
    finally:
        server.close()
    printed = capsys.readouterr()
    needles = list(PLANTED.values())
    assert _grep(root, needles) == []
    assert [n for n in needles if n in printed.out + printed.err] == []
    # the users' own data keeps its URLs (tokens included) in the shards, never in run metadata
    meta = (root / "_inputs" / "_meta.json").read_text()
    assert "DATA-token" not in meta and "signed.parquet" in meta
    assert "DATA-token" in pq.read_table(root / "images" / "00000.parquet").column("url")[0].as_py()
    ids = set(pq.read_table(root / "captions" / "00000.parquet").column("model_id").to_pylist())
    assert ids == {f"openai:http://{host}/scripted-model"}
