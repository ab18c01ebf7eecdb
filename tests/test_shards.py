import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import ShardSpecError
from pipeline.shards import (
    format_shard_spec,
    parse_sample_key,
    parse_shard_spec,
    sample_key,
    shard_name,
    slice_for_task,
)


@pytest.mark.parametrize("spec,expected", [
    ("5", [5]), ("0-3", [0, 1, 2, 3]), ("3,7,10-12", [3, 7, 10, 11, 12]), (" 1 , 4-5 ", [1, 4, 5]),
    ("12,0-1", [0, 1, 12]), ("99999", [99999]),
])
def test_parse_valid(spec, expected):
    assert parse_shard_spec(spec) == expected


@pytest.mark.parametrize("spec,needle", [
    ("", "empty"), ("-1", "negative"), ("5-3", "reversed"), ("1,1", "twice"), ("0-5,3", "twice"),
    ("a", "not a non-negative integer"), ("1,,2", "empty part"), ("1-", "not a non-negative"),
    ("100000", "exceeds"), ("1.5", "not a non-negative"), ("1-2-3", "not a non-negative"),
])
def test_parse_invalid(spec, needle):
    with pytest.raises(ShardSpecError, match=needle):
        parse_shard_spec(spec)


@given(st.sets(st.integers(0, 3000), min_size=1, max_size=200))
def test_format_parse_roundtrip(ids):
    spec = format_shard_spec(ids)
    assert parse_shard_spec(spec) == sorted(ids)
    assert len(spec.split(",")) <= len(ids)


@given(st.lists(st.integers(0, 500), unique=True), st.integers(1, 40))
def test_task_slices_partition_shards(shards, tasks):
    shards = sorted(shards)
    slices = [slice_for_task(shards, tasks, t) for t in range(tasks)]
    assert [s for sl in slices for s in sl] == shards
    sizes = [len(sl) for sl in slices]
    assert max(sizes) - min(sizes) <= 1


def test_names_and_keys():
    assert shard_name(42) == "00042"
    assert sample_key(42, 17) == "000420017"
    assert "." not in sample_key(3, 9999)
    assert parse_sample_key("000420017") == (42, 17)
    with pytest.raises(ValueError):
        sample_key(1, 10_000)
    with pytest.raises(ValueError):
        shard_name(-1)
