"""Shared-prefix ("tree") forward passes for a causal text LM.

A batch of sequences shaped prefix -> mid_i -> leaf_ij computes the common prefix once, each mid once
and each leaf once, by expanding the KV cache (gradients flow through it). Positions are kept
contiguous for every real token, so the result equals running each full sequence on its own.
Used to train the nano reader (few-shot prefix -> caption -> questions) and to score options.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache


def _pad(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if not r:
            continue
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(list(r), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def _cache_kw(model: torch.nn.Module) -> str:
    """The KV-cache keyword of this transformers version ('cache' since 5.24, 'past_key_values' before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def tree_forward(
    model: torch.nn.Module, prefix: Sequence[int], mids: Sequence[Sequence[int]],
    leaves: Sequence[Sequence[Sequence[int]]], pad_id: int, leaf_attentions: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits for prefix -> mids[i] -> leaves[i][j] (every mid has the same number of leaves, mids non-empty).

    Returns (mid_last_logits [C, V]: the logits after each mid's last token, leaf_logits [C*K, L, V],
    leaf_ids [C*K, L], leaf_mask [C*K, L]), leaves in row-major (mid, leaf) order, right-padded.
    With `leaf_attentions` (a list; needs the eager attention implementation) the leaf tokens' attention
    weights of every layer are appended to it, each [C*K, heads, L, len(prefix) + mid width + L]; the
    mids are left-padded, so mid i's token t is key len(prefix) + mid width - len(mids[i]) + t.
    """
    n_mid, k = len(mids), len(leaves[0])
    if any(len(group) != k for group in leaves) or len(leaves) != n_mid:
        raise ValueError("every mid needs the same number of leaves")
    if any(not m for m in mids):
        raise ValueError("mids must be non-empty")
    dev = next(model.parameters()).device
    kw = _cache_kw(model)
    cache = DynamicCache()
    n_pre = len(prefix)
    model(input_ids=torch.tensor([list(prefix)], device=dev), **{kw: cache}, use_cache=True)
    cache.batch_repeat_interleave(n_mid)

    mid_ids, mid_mask = (t.to(dev) for t in _pad(mids, pad_id, left=True))
    mid_pos = n_pre + (mid_mask.cumsum(1) - 1).clamp(min=0)
    attn = torch.cat([torch.ones(n_mid, n_pre, dtype=torch.long, device=dev), mid_mask], 1)
    out = model(input_ids=mid_ids, attention_mask=attn, position_ids=mid_pos, **{kw: cache}, use_cache=True)
    mid_last = out.logits[:, -1]
    cache.batch_repeat_interleave(k)

    flat = [leaf for group in leaves for leaf in group]
    leaf_ids, leaf_mask = (t.to(dev) for t in _pad(flat, pad_id, left=False))
    mid_len = mid_mask.sum(1).repeat_interleave(k)
    leaf_pos = n_pre + mid_len[:, None] + torch.arange(leaf_ids.shape[1], device=dev)[None, :]
    attn = torch.cat([attn.repeat_interleave(k, 0), leaf_mask], 1)
    out = model(input_ids=leaf_ids, attention_mask=attn, position_ids=leaf_pos, **{kw: cache}, use_cache=True,
                output_attentions=leaf_attentions is not None)
    if leaf_attentions is not None:
        leaf_attentions.extend(out.attentions)
    return mid_last, out.logits, leaf_ids, leaf_mask


def leaf_logprobs(mid_last: torch.Tensor, leaf_logits: torch.Tensor, leaf_ids: torch.Tensor,
                  leaf_mask: torch.Tensor, k: int) -> torch.Tensor:
    """Summed log-probability of each whole leaf given prefix + mid: [C*K]."""
    first = torch.log_softmax(mid_last.float(), -1).repeat_interleave(k, 0)
    lp0 = first.gather(1, leaf_ids[:, :1]).squeeze(1)
    rest = torch.log_softmax(leaf_logits[:, :-1].float(), -1).gather(2, leaf_ids[:, 1:, None]).squeeze(2)
    return lp0 * leaf_mask[:, 0] + (rest * leaf_mask[:, 1:]).sum(1)
