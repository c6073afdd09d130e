"""Time-ordered transfer ids (``ledger.ids``): RFC 9562 layout, order, determinism."""

from __future__ import annotations

from uuid import UUID, uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.campus.accounts import part_id, reversal_id
from ledger import ids

prefixes = st.integers(min_value=0, max_value=(1 << ids.PREFIX_BITS) - 1)
rands = st.integers(min_value=0, max_value=(1 << 128) - 1)


@given(prefixes, rands)
def test_uuid7_layout(ms: int, rand: int) -> None:
    u = ids.uuid7(ms, rand)
    assert u.version == 7
    assert u.variant == "specified in RFC 4122"
    assert u.int >> 80 == ms  # the time survives intact
    assert u == UUID(str(u))


@given(prefixes, prefixes, rands, rands)
def test_uuid7_sorts_by_time(a: int, b: int, ra: int, rb: int) -> None:
    if a < b:
        assert ids.uuid7(a, ra) < ids.uuid7(b, rb)
        assert ids.uuid7(a, ra).bytes < ids.uuid7(b, rb).bytes  # as PostgreSQL compares uuid


@given(prefixes, st.lists(st.binary(max_size=8), max_size=4))
def test_ordered_is_deterministic_v8(prefix: int, parts: list[bytes]) -> None:
    u = ids.ordered(prefix, *parts)
    assert u == ids.ordered(prefix, *parts)
    assert u.version == 8 and u.variant == "specified in RFC 4122"
    assert u.int >> 80 == prefix


def test_ordered_parts_are_unambiguous() -> None:
    # without length prefixes ("ab", "c") and ("a", "bc") would hash alike
    assert ids.ordered(1, b"ab", b"c") != ids.ordered(1, b"a", b"bc")
    assert ids.ordered(1, b"ab") != ids.ordered(2, b"ab")


def test_prefix_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError):
        ids.uuid7(1 << ids.PREFIX_BITS, 0)
    with pytest.raises(ValueError):
        ids.ordered(-1)


@given(prefixes, rands)
def test_children_sit_beside_their_parent(ms: int, rand: int) -> None:
    key = ids.uuid7(ms, rand)
    parts = {part_id(key, p) for p in ("subsidy", "cash", "room")}
    assert len(parts) == 3 and key not in parts
    for p in parts:
        assert p.int >> 80 == ms
        assert reversal_id(p).int >> 80 == ms and reversal_id(p) not in parts
    assert part_id(key, "cash") == part_id(key, "cash")


def test_child_of_a_random_key_is_still_derived() -> None:
    key = uuid4()  # a client's own key: derivation must not depend on its shape
    assert part_id(key, "cash") == part_id(UUID(str(key)), "cash")
    assert part_id(key, "cash") != part_id(key, "subsidy")
