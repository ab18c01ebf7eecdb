"""GPU memory arithmetic for sizing hf engine batches from free memory instead of a fixed batch size.

A batch row of prompt width W that decodes T new tokens holds its KV cache for W + T positions, the
prefill's activations of one layer for its W tokens (the vision tower's for its image patches) and
float32 logits of the vocabulary while sampling. `rows_that_fit` divides a memory budget by that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RowCost:
    """Bytes per token of one batch row, read from a model config."""

    kv_per_token: int
    activation_per_token: int
    vision_per_patch: int
    logits_per_row: int

    def row_bytes(self, width: int, new_tokens: int, image_patches: int = 0) -> int:
        return ((width + new_tokens) * self.kv_per_token + width * self.activation_per_token
                + image_patches * self.vision_per_patch + self.logits_per_row)


def _get(cfg: Any, *names: str, default: int = 0) -> int:
    for name in names:
        value = getattr(cfg, name, None)
        if value:
            return int(value)
    return default


def row_cost(config: Any, dtype_bytes: int) -> RowCost:
    """The per-token costs of a causal LM or VL model config (`text_config` / `vision_config` when present)."""
    text = getattr(config, "text_config", None) or config
    hidden = _get(text, "hidden_size")
    heads = _get(text, "num_attention_heads", default=1)
    kv_heads = _get(text, "num_key_value_heads", default=heads)
    head_dim = _get(text, "head_dim", default=hidden // heads)
    layers = _get(text, "num_hidden_layers")
    inter = _get(text, "intermediate_size", default=4 * hidden)
    vocab = _get(text, "vocab_size", default=_get(config, "vocab_size"))
    vision = getattr(config, "vision_config", None)
    v_hidden = _get(vision, "hidden_size", "embed_dim") if vision is not None else 0
    v_inter = _get(vision, "intermediate_size", default=4 * v_hidden) if vision is not None else 0
    return RowCost(
        kv_per_token=2 * layers * kv_heads * head_dim * dtype_bytes,
        # one layer's live tensors: residual + normed input, q/k/v/o, the MLP's gate/up/product
        activation_per_token=(6 * hidden + 3 * inter) * dtype_bytes,
        vision_per_patch=(6 * v_hidden + 3 * v_inter) * dtype_bytes,
        logits_per_row=3 * vocab * 4,  # float32 logits, their softmax and the processed scores
    )


def rows_that_fit(budget_bytes: int, cost: RowCost, width: int, new_tokens: int, image_patches: int = 0) -> int:
    """How many rows of this shape fit in `budget_bytes` (at least 1)."""
    return max(1, budget_bytes // max(1, cost.row_bytes(width, new_tokens, image_patches)))


def free_gpu_bytes(device: Any) -> int | None:
    """Free memory on a CUDA device, counting what PyTorch's allocator holds but does not use; None off-GPU."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
