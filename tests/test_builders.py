"""The model builders: tokenizer, processor and tiny configs round-trip through from_pretrained."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from pipeline.mcq import CAPTION_PROMPT
from pipeline.nano import world
from pipeline.nano.builders import (
    IMAGE_SIDE,
    IMAGE_TOKENS,
    QWEN3_IMAGE_SIDE,
    SPECIAL_TOKENS,
    build_processor,
    build_tokenizer,
    model_vocab_size,
    save_model_dir,
    tiny_text_config,
    tiny_vl_config,
)


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    return build_tokenizer([world.caption(world.sample_scene(rng), t) for t in range(3) for _ in range(50)])


def test_tokenizer_specials_and_template(tokenizer):
    for t in SPECIAL_TOKENS:
        assert len(tokenizer.encode(t, add_special_tokens=False)) == 1
    assert model_vocab_size(tokenizer) % 64 == 0 and model_vocab_size(tokenizer) >= len(tokenizer)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    s = "The image shows two shapes on a gray background."
    assert tokenizer.decode(tokenizer.encode(s, add_special_tokens=False)) == s


@pytest.mark.parametrize("vl_family,text_family,side", [("qwen2.5-vl", "qwen2", IMAGE_SIDE),
                                                          ("qwen3-vl", "qwen3", QWEN3_IMAGE_SIDE)])
def test_vl_and_text_roundtrip(tokenizer, tmp_path, vl_family, text_family, side):
    """Both generations: Qwen2.5-VL + Qwen2 and Qwen3-VL + Qwen3; side x side images are 4 x 4 tokens on either
    grid (28 px / 32 px)."""
    torch.manual_seed(0)
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2ForCausalLM,
        Qwen3ForCausalLM,
        Qwen3VLForConditionalGeneration,
    )

    proc = build_processor(tokenizer, side=side, family=vl_family)
    assert proc.image_processor.patch_size * proc.image_processor.merge_size == side // 4
    vl_cls = Qwen3VLForConditionalGeneration if vl_family == "qwen3-vl" else Qwen2_5_VLForConditionalGeneration
    vl = vl_cls(tiny_vl_config(tokenizer, family=vl_family))
    save_model_dir(vl, tokenizer, proc, tmp_path / "vl")
    txt = (Qwen3ForCausalLM if text_family == "qwen3" else Qwen2ForCausalLM)(tiny_text_config(tokenizer, family=text_family))
    save_model_dir(txt, tokenizer, None, tmp_path / "txt")

    p = AutoProcessor.from_pretrained(tmp_path / "vl")
    m = AutoModelForImageTextToText.from_pretrained(tmp_path / "vl")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]}]
    prompt = p.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    img = world.render(world.sample_scene(random.Random(1)), size=side)
    batch = p(text=[prompt], images=[img], return_tensors="pt")
    assert int((batch["input_ids"] == m.config.image_token_id).sum()) == IMAGE_TOKENS
    with torch.no_grad():
        a = m(**batch).logits
        b = vl(**batch).logits
    assert torch.allclose(a, b)

    t = AutoTokenizer.from_pretrained(tmp_path / "txt")
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "txt")
    ids = t("The image shows", return_tensors="pt")
    assert ids["input_ids"].tolist() == tokenizer("The image shows", return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.allclose(lm(**ids).logits, txt(**ids).logits)
