"""Model engines behind one interface: hf (transformers), vllm (offline), openai (HTTP), noop (tests/benchmarks)."""

from pipeline.engines.base import ChatRequest, Engine, Generation, Sampling, create_engine

__all__ = ["ChatRequest", "Engine", "Generation", "Sampling", "create_engine"]
