"""Shared-prefix planning for batched decoding."""

from __future__ import annotations

from pipeline.engines.prefix import common_prefix, plan_prefixes


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


def test_plan_finds_common_prefix_and_groups():
    head = list(range(100, 140))  # 40 tokens every row shares
    cap_a = list(range(200, 230))  # 30 tokens shared by the draws of caption a
    cap_b = list(range(300, 325))
    rows = [head + cap_a + [1, 2], head + cap_b + [3], head + cap_a + [4, 5, 6], head + cap_b + [7, 8], head + [9]]
    plan = plan_prefixes(rows, min_tokens=16)
    assert plan.shared == 40
    assert plan.row_group[0] == plan.row_group[2] != plan.row_group[1] == plan.row_group[3]
    assert plan.group_len[plan.row_group[0]] == 70 and plan.group_len[plan.row_group[1]] == 65
    assert plan.group_len[plan.row_group[4]] == 40  # a lone row shares only the common prefix
    assert plan.saved_tokens([len(r) for r in rows]) == 4 * 40 + 30 + 25


def test_every_row_keeps_a_token_and_unrelated_rows_get_no_plan():
    rows = [list(range(50)), list(range(50))]
    plan = plan_prefixes(rows, min_tokens=16)
    assert plan.shared == 49 and plan.group_len == (49, 49)
    assert plan_prefixes([list(range(50)), list(range(1, 51))]) is None
    assert plan_prefixes([list(range(50))]) is None
