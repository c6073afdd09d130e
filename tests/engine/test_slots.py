"""engine.slots: which connection gives way to a newcomer, and who is refused."""

from __future__ import annotations

import pytest

from engine.slots import PeerSlots, peer_of


def test_a_newcomer_takes_the_slot_of_the_most_crowded_peers_oldest() -> None:
    slots: PeerSlots[str] = PeerSlots(max_total=4, max_per_peer=10)
    for conn, peer in [("a1", "A"), ("b1", "B"), ("b2", "B"), ("c1", "C")]:
        assert slots.admit(conn, peer) == (True, None)
    # B holds the most evictable connections: its oldest gives way, not A's older one
    assert slots.admit("d1", "D") == (True, "b1")
    assert "b1" not in slots and len(slots) == 4
    # a tie (A, B, C, D hold one each): the peer that reached that size first
    assert slots.admit("e1", "E") == (True, "a1")


def test_settled_connections_never_give_way() -> None:
    slots: PeerSlots[str] = PeerSlots(max_total=2, max_per_peer=10)
    slots.admit("a1", "A")
    slots.admit("b1", "B")
    slots.settle("a1")
    slots.settle("b1")
    assert slots.admit("c1", "C") == (False, None)  # refused: all proved themselves
    assert slots.admit("c1", "C", overflow=True) == (True, None)  # or kept beyond the total
    assert len(slots) == 3
    slots.unsettle("a1")  # evictable again (an idle keep-alive connection), as the newest
    assert slots.admit("d1", "D") == (True, "c1")  # C is as crowded as A, and was first


def test_a_peer_at_its_cap_only_displaces_itself() -> None:
    slots: PeerSlots[str] = PeerSlots(max_total=100, max_per_peer=2)
    slots.admit("a1", "A")
    slots.admit("a2", "A")
    slots.admit("b1", "B")
    assert slots.admit("a3", "A") == (True, "a1")
    slots.settle("a2")
    slots.settle("a3")
    assert slots.admit("a4", "A") == (False, None)
    assert slots.of_peer("A") == 2 and slots.of_peer("B") == 1


def test_leave_is_idempotent_and_frees_the_slot() -> None:
    slots: PeerSlots[str] = PeerSlots(max_total=1, max_per_peer=1)
    slots.admit("a1", "A")
    slots.settle("a1")
    slots.leave("a1")
    slots.leave("a1")
    assert len(slots) == 0 and slots.of_peer("A") == 0
    assert slots.admit("a2", "A") == (True, None)


@pytest.mark.parametrize(
    ("host", "peer"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::9", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        (None, ""),
    ],
)
def test_peer_of(host: str | None, peer: str) -> None:
    assert peer_of(host) == peer
