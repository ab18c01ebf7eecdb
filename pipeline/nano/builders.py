"""Offline builders for small Qwen-style checkpoints: tokenizer, processor, tiny configs, saving.

Two families: Qwen2.5-VL captioners with Qwen2 readers (14 px patches, a 28 px grid) and the CapRL++
generation, Qwen3-VL captioners (16 px patches, a 32 px grid) with Qwen3 readers (hybrid thinking:
their chat template opens an empty <think> block when called with enable_thinking=False).

Used by the nano recipe (pipeline/nano) and by tests that need random-weight models. Everything a
`save_model_dir` writes loads back with AutoTokenizer / AutoProcessor / AutoModelForImageTextToText /
AutoModelForCausalLM exactly like a real checkpoint; nothing touches a model hub.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3Config,
    Qwen3VLConfig,
)

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)
THINK_TOKENS = ("<think>", "</think>")
"""Qwen3 readers only (a Qwen2 tokenizer stays as it was); added tokens that are not special, as in Qwen3's own
tokenizer, so a decoded answer still shows them."""
VOCAB_MULTIPLE = 64
IMAGE_SIDE = 112
PATCH_SIZE = 14
MERGE_SIZE = 2
IMAGE_TOKENS = (IMAGE_SIDE // PATCH_SIZE // MERGE_SIZE) ** 2  # 16
QWEN3_PATCH_SIZE = 16
QWEN3_IMAGE_SIDE = 128  # 4 x 4 tokens on Qwen3-VL's 32 px grid
VL_FAMILIES = ("qwen2.5-vl", "qwen3-vl")
TEXT_FAMILIES = ("qwen2", "qwen3")

# Qwen-style ChatML template with no default system prompt; images/videos become vision placeholders.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}"
    "{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3's hybrid thinking, as in Qwen3-4B's own template: with enable_thinking=False the generation prompt ends
# with an empty think block (otherwise the model is free to think first), and a final assistant message (a
# prefill continued by a server) is rendered after an empty think block too.
QWEN3_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "<|im_start|>{{ message['role'] }}\n",
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}",
).replace(
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}")


def _padded(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 2,
                    extra_tokens: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with the Qwen special tokens, `extra_tokens` as added
    (not special) tokens, and the chat template.

    `vocab_size` caps the BPE merges (special tokens included); the model's embedding size is the
    tokenizer's length padded to a multiple of 64 (see `model_vocab_size`).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        bos_token=None, model_max_length=4096, padding_side="left", clean_up_tokenization_spaces=False,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    )
    if extra_tokens:
        fast.add_tokens(list(extra_tokens), special_tokens=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def model_vocab_size(tokenizer: PreTrainedTokenizerFast) -> int:
    """Embedding rows for a model using `tokenizer`: its length padded to a multiple of 64."""
    return _padded(len(tokenizer))


def build_processor(tokenizer: PreTrainedTokenizerFast, side: int = IMAGE_SIDE, family: str = "qwen2.5-vl"
                    ) -> ProcessorMixin:
    """A Qwen2.5-VL (patch 14) or Qwen3-VL (patch 16) processor for side x side images, merge 2:
    (side / (2 x patch))^2 image tokens."""
    if family not in VL_FAMILIES:
        raise ValueError(f"unknown VL family {family!r}: one of {VL_FAMILIES}")
    pixels = side * side
    patch = PATCH_SIZE if family == "qwen2.5-vl" else QWEN3_PATCH_SIZE
    image_processor = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=patch,
                                            merge_size=MERGE_SIZE, temporal_patch_size=2)
    if family == "qwen3-vl":
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        video = Qwen3VLVideoProcessor(size={"shortest_edge": pixels, "longest_edge": pixels * 8}, patch_size=patch,
                                      merge_size=MERGE_SIZE, temporal_patch_size=2)
        return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video,
                                chat_template=CHAT_TEMPLATE)
    try:
        video_processor = Qwen2VLVideoProcessor(min_pixels=pixels, max_pixels=pixels * 8, patch_size=PATCH_SIZE,
                                                merge_size=MERGE_SIZE, temporal_patch_size=2)
    except (TypeError, ValueError):  # older transformers: defaults (videos are unused by the pipeline)
        video_processor = Qwen2VLVideoProcessor()
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=video_processor, chat_template=CHAT_TEMPLATE)


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer lacks special tokens {missing}")
    return ids


def tiny_vl_config(
    tokenizer: PreTrainedTokenizerFast, hidden: int = 128, layers: int = 2, heads: int = 2, kv_heads: int = 1,
    ffn: int = 256, vision_depth: int = 2, vision_hidden: int = 128, vision_heads: int = 2,
    vision_ffn: int = 256, mrope_section: Sequence[int] = (8, 12, 12), max_positions: int = 2048,
    family: str = "qwen2.5-vl",
) -> Qwen2_5_VLConfig | Qwen3VLConfig:
    """A tiny Qwen2.5-VL (14 px patches, windowed vision attention) or Qwen3-VL (16 px patches, one deepstack
    layer, interleaved mrope) config; defaults: ~1.2 M parameters, head_dim = hidden/heads = 64."""
    if family not in VL_FAMILIES:
        raise ValueError(f"unknown VL family {family!r}: one of {VL_FAMILIES}")
    ids = _special_ids(tokenizer)
    head_dim = hidden // heads
    if 2 * sum(mrope_section) != head_dim:
        raise ValueError(f"mrope_section {list(mrope_section)} must sum to head_dim/2 = {head_dim // 2}")
    qwen3 = family == "qwen3-vl"
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope_section)}
    text_config: dict[str, Any] = {
        "vocab_size": model_vocab_size(tokenizer), "hidden_size": hidden, "intermediate_size": ffn,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": max_positions, "rms_norm_eps": 1e-6,
        "rope_parameters": {**rope, "mrope_interleaved": True} if qwen3 else rope,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        **({"head_dim": head_dim} if qwen3 else {"tie_word_embeddings": True}),
    }
    vision_config: dict[str, Any] = {
        "depth": vision_depth, "hidden_size": vision_hidden, "intermediate_size": vision_ffn,
        "num_heads": vision_heads, "out_hidden_size": hidden, "patch_size": QWEN3_PATCH_SIZE if qwen3 else PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE, "temporal_patch_size": 2, "in_channels": 3,
        **({"num_position_embeddings": 64, "deepstack_visual_indexes": [vision_depth - 1]} if qwen3 else
           {"window_size": IMAGE_SIDE, "fullatt_block_indexes": list(range(vision_depth))}),
    }
    return (Qwen3VLConfig if qwen3 else Qwen2_5_VLConfig)(
        text_config=text_config, vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def tiny_text_config(
    tokenizer: PreTrainedTokenizerFast, hidden: int = 128, layers: int = 4, heads: int = 2, kv_heads: int = 1,
    ffn: int = 256, max_positions: int = 2048, family: str = "qwen2",
) -> Qwen2Config | Qwen3Config:
    """A tiny text-only Qwen2 config (the nano reader) or Qwen3 config (q/k norms, explicit head_dim: the CapRL++
    reader's family)."""
    if family not in TEXT_FAMILIES:
        raise ValueError(f"unknown text family {family!r}: one of {TEXT_FAMILIES}")
    ids = _special_ids(tokenizer)
    extra: dict[str, Any] = {"head_dim": hidden // heads} if family == "qwen3" else {}
    return (Qwen3Config if family == "qwen3" else Qwen2Config)(
        vocab_size=model_vocab_size(tokenizer), hidden_size=hidden, intermediate_size=ffn,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        **extra,
    )


def save_model_dir(model: Any, tokenizer: PreTrainedTokenizerFast, processor: ProcessorMixin | None,
                   path: str | Path) -> Path:
    """Write model weights (safetensors) + config + generation config + tokenizer (+ processor) to `path`."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        gen.pad_token_id = tokenizer.pad_token_id
        gen.bos_token_id = None
        gen.do_sample = False
        gen.temperature = None
        gen.top_p = None
        gen.top_k = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if processor is not None:
        processor.save_pretrained(out)
    return out
