"""The openai engine against a scripted OpenAI-compatible HTTP server (a stand-in for `vllm serve`;
the real server is exercised in test_engine_vllm.py)."""

from __future__ import annotations

import base64
import io
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from pipeline.config import EngineConfig
from pipeline.engines import ChatRequest, Engine, Sampling, create_engine
from pipeline.engines.openai import OpenAIEngine


class ScriptedServer:
    """Answers /v1/models and /v1/chat/completions; misbehaves on cue words in the user's message."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.seen: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, payload: dict | str) -> None:
                raw = (json.dumps(payload) if isinstance(payload, dict) else payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                self._send(200, {"data": [{"id": "scripted-model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.bodies.append(body)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    server.answer(self, body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, h, body: dict) -> None:
        user = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
        text = user if isinstance(user, str) else " ".join(p.get("text", "") for p in user if p["type"] == "text")
        with self.lock:
            self.seen[text] = self.seen.get(text, 0) + 1
            count = self.seen[text]
        time.sleep(0.05)
        if "always-500" in text:
            return h._send(500, "internal error")
        if "bad-request" in text:
            return h._send(400, {"error": "unknown parameter"})
        if "flaky" in text and count <= 2:
            return h._send(503, "overloaded")
        if "slow" in text:
            time.sleep(2.0)
        if "garbage" in text:
            return h._send(200, {"unexpected": True})
        choices = [{"index": k, "message": {"role": "assistant", "content": f" {text} #{k}"},
                    "finish_reason": "length" if "long" in text else "stop"} for k in range(body.get("n", 1))]
        h._send(200, {"choices": choices, "usage": {"completion_tokens": 3 * len(choices)}})

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture()
def server():
    s = ScriptedServer()
    yield s
    s.close()


def engine_for(server: ScriptedServer, **kw) -> OpenAIEngine:
    cfg = EngineConfig(backend="openai", base_url=server.url, timeout_s=1.0, max_retries=3, retry_backoff_s=0.01,
                       concurrency=4, **kw)
    engine = create_engine(cfg)
    assert isinstance(engine, OpenAIEngine) and isinstance(engine, Engine)
    return engine


def user(text: str) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}])


def test_results_in_order_with_n_samples_and_bounded_concurrency(server):
    engine = engine_for(server)
    reqs = [user(f"question {i}") for i in range(20)]
    out = engine.generate(reqs, Sampling(n=2, max_new_tokens=5, temperature=0.6))
    assert [[g.text for g in gens] for gens in out] == [[f" question {i} #0", f" question {i} #1"] for i in range(20)]
    assert all(g.finish_reason == "stop" and g.num_tokens == 3 for gens in out for g in gens)
    assert 1 < server.max_in_flight <= 4
    body = server.bodies[-1]
    assert body["model"] == "scripted-model" and body["n"] == 2 and body["max_tokens"] == 5
    assert engine.model_id.endswith("/scripted-model")


def test_failures_stay_per_request_and_retries_back_off(server):
    engine = engine_for(server)
    reqs = [user("fine"), user("flaky one"), user("always-500"), user("bad-request"), user("slow"), user("garbage"),
            user("long answer")]
    out = engine.generate(reqs, Sampling(max_new_tokens=5))
    [fine], [flaky], [e500], [e400], [slow], [garbage], [long] = out
    assert fine.text == " fine #0" and fine.error is None
    assert flaky.text == " flaky one #0"  # two 503s, then success
    assert e500.finish_reason == "error" and "HTTP 500" in e500.error
    assert server.seen["always-500"] == 4  # first try + 3 retries
    assert e400.finish_reason == "error" and "HTTP 400" in e400.error
    assert server.seen["bad-request"] == 1  # not retryable
    assert slow.finish_reason == "error" and "timeout" in slow.error
    assert garbage.finish_reason == "error" and "KeyError" in garbage.error
    assert long.finish_reason == "length"
    assert engine.stats["retries"] >= 2 + 3 + 3


def test_unreachable_server_gives_error_generations():
    engine = create_engine(EngineConfig(backend="openai", base_url="http://127.0.0.1:9/v1", model="m",
                                        max_retries=1, retry_backoff_s=0.01, timeout_s=1.0))
    out = engine.generate([user("a"), user("b")], Sampling(n=2))
    assert all(g.finish_reason == "error" and g.error for gens in out for g in gens)
    assert all(len(gens) == 2 for gens in out)


def test_prefill_and_images_on_the_wire(server, tmp_path):
    from transformers import Qwen2VLImageProcessor

    Qwen2VLImageProcessor(patch_size=14, merge_size=2).save_pretrained(tmp_path)  # the served model's processor
    engine = engine_for(server, model="served-name", processor=str(tmp_path), max_pixels=28 * 28 * 16)
    img = Image.new("RGBA", (300, 200), (255, 0, 0, 255))
    content = [{"type": "image"}, {"type": "text", "text": "describe"}]
    req = ChatRequest(messages=[{"role": "user", "content": content}], images=[img], prefill="The answer is")
    [[gen]] = engine.generate([req], Sampling())
    assert gen.text == " describe #0"
    body = server.bodies[-1]
    assert body["model"] == "served-name"
    assert body["messages"][-1] == {"role": "assistant", "content": "The answer is"}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.mode == "RGB" and sent.width % 28 == 0 and sent.width * sent.height <= 28 * 28 * 16
    assert "chat_template_kwargs" not in body  # sent only when set


def test_the_served_models_grid_and_template_options(server, tmp_path):
    """A served Qwen3-VL: images on its 32 px grid when `processor` (or a folder `model`) says so; a served name
    alone is never looked up on a hub, and images then only keep to the pixel budget. A reader's chat-template
    options travel in the body."""
    from transformers import Qwen2VLImageProcessor

    Qwen2VLImageProcessor(patch_size=16, merge_size=2).save_pretrained(tmp_path)
    img = Image.new("RGB", (300, 200), "red")
    req = ChatRequest(messages=[{"role": "user", "content": [{"type": "image"}]}], images=[img])
    sizes = []
    for kw in ({"model": str(tmp_path)}, {"model": "served-name", "processor": str(tmp_path)}, {"model": "x"}):
        engine = engine_for(server, max_pixels=32 * 32 * 16, **kw)
        engine.generate([req], Sampling())
        url = server.bodies[-1]["messages"][0]["content"][0]["image_url"]["url"]
        sizes.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size)
    assert sizes[0] == sizes[1] == (128, 96) and sizes[2] == (156, 104)  # 4 x 3 tokens of 32 px; the budget only
    reader = engine_for(server, chat_template_kwargs={"enable_thinking": False})
    reader.generate([user("q")], Sampling())
    assert server.bodies[-1]["chat_template_kwargs"] == {"enable_thinking": False}


def test_instruct_prefill_for_servers_without_continuation(server):
    engine = engine_for(server, openai_prefill="instruct")
    engine.generate([ChatRequest(messages=[{"role": "user", "content": "q"}], prefill="The answer is")], Sampling())
    body = server.bodies[-1]
    assert "continue_final_message" not in body
    assert body["messages"][-1]["role"] == "user" and 'Begin your reply with "The answer is"' in body["messages"][-1]["content"]


def test_score_choices_failures_are_nan(server):
    engine = engine_for(server)
    # the scripted server has no /tokenize: every request fails, as NaN, never as an exception
    scores = engine.score_choices([user("q")], [[" A", " B"]])
    assert len(scores[0]) == 2 and all(math.isnan(s) for s in scores[0])
