"""Random-weight Qwen2 / Qwen3 readers and Qwen2.5-VL / Qwen3-VL captioner checkpoint directories for engine tests and throughput benchmarks.

The tokenizer is trained on demo-world captions and reader prompts, so prompts tokenize compactly;
weights are drawn with a wide normal so that different prompts give different greedy outputs (a
freshly initialised model repeats one token, which would make batching tests meaningless).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from pipeline.mcq import CANNOT_ANSWER, READER_PREFILL, reader_messages, shuffle_options
from pipeline.nano import world
from pipeline.nano.builders import (
    QWEN3_CHAT_TEMPLATE,
    THINK_TOKENS,
    build_processor,
    build_tokenizer,
    save_model_dir,
    tiny_text_config,
    tiny_vl_config,
)


def corpus(n_scenes: int = 60, seed: int = 0) -> list[str]:
    """Captions, questions, options and reader prompt text from the demo world."""
    rng = random.Random(seed)
    texts: list[str] = []
    for _ in range(n_scenes):
        scene = world.sample_scene(rng)
        cap = world.caption(scene, rng.randrange(3))
        texts.append(cap)
        for q in world.pick_mcqs(scene, rng):
            shown = shuffle_options(q, rng, extra_option=CANNOT_ANSWER)
            texts.extend(m["content"] for m in reader_messages(cap, shown))
            texts.append(f"{READER_PREFILL} {shown.answer}. {q.answer_text}.")
    # reader answers: " A" .. " F" become single tokens, as in real LLM tokenizers
    texts.extend(f"{READER_PREFILL} {letter}." for letter in "ABCDEF" for _ in range(200))
    return texts


def _scramble(model: torch.nn.Module, seed: int, std: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                continue
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def build_random_text_model(path: str | Path, seed: int = 0, std: float = 0.2, family: str = "qwen2",
                            **config_kwargs: int) -> Path:
    """A tiny random Qwen2 or Qwen3 causal LM (+ tokenizer) saved to `path`; loads with AutoModelForCausalLM.
    A Qwen3 one has Qwen3's hybrid-thinking chat template (see builders.QWEN3_CHAT_TEMPLATE)."""
    from transformers import Qwen2ForCausalLM, Qwen3ForCausalLM

    tok = build_tokenizer(corpus(seed=seed), vocab_size=1024, extra_tokens=THINK_TOKENS if family == "qwen3" else ())
    torch.manual_seed(seed)
    if family == "qwen3":
        tok.chat_template = QWEN3_CHAT_TEMPLATE
    model_cls = Qwen3ForCausalLM if family == "qwen3" else Qwen2ForCausalLM
    model = model_cls(tiny_text_config(tok, family=family, **config_kwargs))
    _scramble(model, seed, std)
    return save_model_dir(model, tok, None, path)


def build_random_vl_model(path: str | Path, seed: int = 0, std: float = 0.2, family: str = "qwen2.5-vl",
                          **config_kwargs: int) -> Path:
    """A tiny random Qwen2.5-VL or Qwen3-VL (+ tokenizer, processor) saved to `path`; loads with
    AutoModelForImageTextToText."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    tok = build_tokenizer(corpus(seed=seed), vocab_size=1024)
    torch.manual_seed(seed)
    model_cls = Qwen3VLForConditionalGeneration if family == "qwen3-vl" else Qwen2_5_VLForConditionalGeneration
    model = model_cls(tiny_vl_config(tok, family=family, **config_kwargs))
    _scramble(model, seed, std)
    return save_model_dir(model, tok, build_processor(tok, family=family), path)
