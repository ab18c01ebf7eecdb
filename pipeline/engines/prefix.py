"""Shared-prompt-prefix planning for batched decoding (used by the hf engine).

Reader prompts in a reward batch share the instruction and few-shot examples (all rows) and the
caption (the draws of one caption). A plan finds, for one batch of token rows, the prefix shared by
all rows and groups of rows sharing a longer prefix, so the engine computes each shared span once:
first the common prefix (one row), then each group's middle span (one row per group), then every
row's own suffix, reusing the KV cache of the spans before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MIN_SHARED_TOKENS = 16


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(frozen=True)
class PrefixPlan:
    shared: int
    """Tokens every row shares (0: none worth sharing)."""
    group_len: tuple[int, ...]
    """Per group: tokens its rows share (>= shared)."""
    row_group: tuple[int, ...]
    """Per row: its group."""

    @property
    def groups(self) -> int:
        return len(self.group_len)

    def saved_tokens(self, lengths: Sequence[int]) -> int:
        """Token positions not recomputed thanks to the plan."""
        full = sum(lengths)
        mids = sum(g - self.shared for g in self.group_len)
        suffixes = sum(n - self.group_len[g] for n, g in zip(lengths, self.row_group, strict=True))
        return full - (self.shared + mids + suffixes)


def plan_prefixes(rows: Sequence[Sequence[int]], min_tokens: int = MIN_SHARED_TOKENS) -> PrefixPlan | None:
    """A plan for `rows` (each keeps at least one token of its own), or None when sharing saves little."""
    if len(rows) < 2:
        return None
    order = sorted(range(len(rows)), key=lambda i: tuple(rows[i]))
    limit = min(len(r) for r in rows) - 1
    shared = min(limit, min(common_prefix(rows[order[0]], rows[i]) for i in order))
    if shared < min_tokens:
        shared = 0
    groups: list[list[int]] = []
    for i in order:
        if groups and common_prefix(rows[groups[-1][0]], rows[i]) >= shared + min_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    group_len = []
    for members in groups:
        if len(members) == 1:
            group_len.append(shared)
            continue
        first = rows[members[0]]
        n = min(common_prefix(first, rows[m]) for m in members[1:])
        n = min(n, min(len(rows[m]) for m in members) - 1)
        group_len.append(n if n >= shared + min_tokens else shared)
    row_group = [0] * len(rows)
    for g, members in enumerate(groups):
        for m in members:
            row_group[m] = g
    plan = PrefixPlan(shared, tuple(group_len), tuple(row_group))
    if plan.saved_tokens([len(r) for r in rows]) < min_tokens * len(rows) // 2:
        return None
    return plan
