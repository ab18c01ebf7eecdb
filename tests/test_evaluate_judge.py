"""evaluate's optional VLM judge through the openai engine, against a local stub server with fixed scores."""

from __future__ import annotations

import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pytest
import yaml

from pipeline.config import JudgeConfig, load_config
from pipeline.demo import make_heldout_benchmark
from pipeline.runner import run_stage
from stages.evaluate.judge import parse_scores

# the held-out benchmark's reference captions cycle through the world's 3 templates (scene i: template i % 3)
ANSWERS = {
    "The image shows": 'Here you go: {"factuality": 9, "coverage": 8, "hallucination": 1}',
    "background with": "The description looks mostly right to me.",  # malformed: no JSON
    "On a": '{"factuality": 6, "coverage": 5.5, "hallucination": 3}',
}


class StubJudge:
    """An OpenAI-compatible server: answers by the caption's opening words; counts the requests."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, payload: dict) -> None:
                raw = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                self._send({"data": [{"id": "stub-judge"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                parts = body["messages"][-1]["content"]
                text = " ".join(p.get("text", "") for p in parts if p["type"] == "text")
                caption = re.search(r"<description>\n(.*)\n</description>", text, re.S).group(1)
                answer = next(a for start, a in ANSWERS.items() if start in caption)
                self._send({"choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                         "finish_reason": "stop"}], "usage": {"completion_tokens": 5}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture()
def stub():
    s = StubJudge()
    yield s
    s.httpd.shutdown()


def test_parse_scores_rules():
    assert parse_scores('x {"factuality": 10, "coverage": 0, "hallucination": 2.5} y', 10) == {
        "factuality": 1.0, "coverage": 0.0, "hallucination": 0.25}
    for bad in ("no json", '{"factuality": 9, "coverage": 8}', '{"factuality": 11, "coverage": 1, "hallucination": 1}',
                '{"factuality": "high", "coverage": 1, "hallucination": 1}', '{"factuality": true, "coverage": 1, '
                '"hallucination": 1}'):
        with pytest.raises(ValueError):
            parse_scores(bad, 10)


def test_judge_scores_parsed_and_a_malformed_answer_is_a_recorded_failure(tmp_path: Path, stub: StubJudge):
    bench = make_heldout_benchmark(tmp_path / "world", n_scenes=3, questions=1)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"root": str(tmp_path / "root"), "evaluate": {
        "name": "judged", "captioners": {}, "baselines": ["empty", "reference"],
        "reader": {"backend": "noop"}, "answer_mode": "score",
        "benchmarks": [{"name": "heldout", "kind": "jsonl", "path": str(bench), "truth": "demo-scene"}],
        "judge": {"engine": {"backend": "openai", "base_url": stub.url, "timeout_s": 5, "max_retries": 0},
                  "retries": 1}}}))
    out = io.StringIO()
    assert run_stage(load_config(manifest), "evaluate", None, progress=False, out=out).exit_code == 0, out.getvalue()
    unit = tmp_path / "root" / "eval" / "judged"
    report = json.loads((unit / "report.json").read_text())
    judge = report["judge"]
    assert judge["model"].endswith("stub-judge") and judge["prompt"] == JudgeConfig().prompt
    assert list(judge["captioners"]) == ["reference"]  # the empty caption is not judged
    ref = judge["captioners"]["reference"]
    assert ref["judged"] == 2 and ref["failed"] == 1
    assert ref["factuality"] == pytest.approx((0.9 + 0.6) / 2)
    assert ref["coverage"] == pytest.approx((0.8 + 0.55) / 2)
    assert ref["hallucination"] == pytest.approx((0.1 + 0.3) / 2)
    rows = pl.read_parquet(unit / "judge.parquet").sort("image_id")
    assert rows["status"].to_list() == ["ok", "failed", "ok"]
    failed = rows.row(1, named=True)
    assert failed["factuality"] is None and failed["error"].startswith("malformed answer: no JSON")
    assert failed["raw"] == [ANSWERS["background with"]] * 2  # asked again once, both answers kept
    assert rows.row(0, named=True)["raw"] == [ANSWERS["The image shows"]]
    assert len(stub.requests) == 4  # 3 captions + 1 retry
    table = (unit / "report.md").read_text()
    assert "| reference | 75.0 | 67.5 | 20.0 | 2 | 1 |" in table
    # the truth-based metrics beside it: the reference states the scene, the empty caption claims nothing
    faith = {name: c["faithfulness"] for name, c in report["captioners"].items()}
    assert faith["reference"]["coverage"] == 1.0 and faith["reference"]["hallucination"] == 0.0
    assert faith["empty"]["coverage"] == 0.0 and faith["empty"]["hallucination"] is None
    assert report["captioners"]["reference"]["per_benchmark"]["heldout"]["faithfulness"]["captions"] == 3
    assert "| 100.0 | 0.0 | 0.0 |" in table.split("| reference | ")[1].split("\n")[0]
