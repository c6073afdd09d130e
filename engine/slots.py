"""Connection slots by peer address, for the two network doors (HTTP edge, terminal gateway).

A flood of connections that never prove anything (no byte, half a request head, no frame with
a good MAC) must not lock out the clients who do. Every connection counts against its peer's
cap and against the total. Until the door knows a connection is a real client (a complete
request head; a frame whose MAC verified) it is *evictable*, and a newcomer that finds no free
slot takes the slot of an evictable connection instead of being refused:

- a newcomer whose own peer is at its cap takes the place of that peer's own oldest evictable
  connection (a flood from one address only ever displaces itself);
- a newcomer that finds the total full takes the place of the oldest evictable connection of
  the peer holding the most evictable connections (a flood from a few addresses displaces
  itself before it displaces a lone honest newcomer, however fast it reconnects).

Only when nothing is evictable is a newcomer refused. Peers are IPv4 addresses and IPv6 /64
prefixes (one host usually owns a whole /64).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["PeerSlots", "peer_of"]

C = TypeVar("C", bound=Hashable)

_IPV6_HOST_BITS = 64


def peer_of(host: str | None) -> str:
    """The peer a connection from ``host`` counts against: the IPv4 address, or the IPv6
    /64 prefix (an IPv4-mapped IPv6 address is its IPv4 address); ``""`` when unknown."""
    if not host:
        return ""
    if ":" not in host:
        return host  # IPv4, as the kernel spells it (the common case, without parsing)
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        net = ipaddress.IPv6Network((int(addr) >> _IPV6_HOST_BITS << _IPV6_HOST_BITS, 64))
        return str(net)
    return str(addr)


class PeerSlots(Generic[C]):
    """The open connections of one door, by peer, and which of them may be evicted.

    ``max_total`` None: no total cap (only the per-peer one). All operations are O(1).
    """

    def __init__(self, *, max_total: int | None, max_per_peer: int) -> None:
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self._peer: dict[C, str] = {}
        self._count: Counter[str] = Counter()
        # peer -> its evictable connections, in the order they became evictable
        self._evictable: dict[str, dict[C, None]] = {}
        # n -> the peers with exactly n evictable connections (n >= 1), and the largest such n
        self._by_size: dict[int, dict[str, None]] = {}
        self._most = 0

    def __len__(self) -> int:
        return len(self._peer)

    def __contains__(self, conn: object) -> bool:
        return conn in self._peer

    def of_peer(self, peer: str) -> int:
        """Open connections of ``peer``."""
        return self._count[peer]

    def admit(self, conn: C, peer: str, *, overflow: bool = False) -> tuple[bool, C | None]:
        """Give ``conn`` (from ``peer``) a slot, evictable until ``settle``.

        Returns (admitted, victim): ``victim`` is the connection whose slot it took (already
        forgotten here; the caller drops it). Not admitted: its peer is at its cap with
        nothing of its own to evict, or (unless ``overflow``) the total is full with nothing
        evictable. With ``overflow`` such a connection is admitted beyond the total (the
        caller refuses it another way).
        """
        victim: C | None = None
        if self._count[peer] >= self.max_per_peer:
            mine = self._evictable.get(peer)
            if not mine:
                return False, None
            victim = next(iter(mine))
        elif self.max_total is not None and len(self._peer) >= self.max_total:
            victim = self._largest_oldest()
            if victim is None and not overflow:
                return False, None
        if victim is not None:
            self.leave(victim)
        self._peer[conn] = peer
        self._count[peer] += 1
        self._add_evictable(conn, peer)
        return True, victim

    def settle(self, conn: C) -> None:
        """``conn`` proved itself (for now): it is no longer evicted for a newcomer."""
        peer = self._peer.get(conn)
        if peer is not None:
            self._drop_evictable(conn, peer)

    def unsettle(self, conn: C) -> None:
        """``conn`` is evictable again, as the newest (an HTTP connection between requests)."""
        peer = self._peer.get(conn)
        if peer is not None:
            self._drop_evictable(conn, peer)
            self._add_evictable(conn, peer)

    def leave(self, conn: C) -> None:
        """Forget ``conn`` (closed or evicted); a no-op when it is not here."""
        peer = self._peer.pop(conn, None)
        if peer is None:
            return
        self._drop_evictable(conn, peer)
        self._count[peer] -= 1
        if not self._count[peer]:
            del self._count[peer]

    def _largest_oldest(self) -> C | None:
        if not self._most:
            return None
        peer = next(iter(self._by_size[self._most]))
        return next(iter(self._evictable[peer]))

    def _add_evictable(self, conn: C, peer: str) -> None:
        mine = self._evictable.setdefault(peer, {})
        self._resize(peer, len(mine), len(mine) + 1)
        mine[conn] = None

    def _drop_evictable(self, conn: C, peer: str) -> None:
        mine = self._evictable.get(peer)
        if mine is None or conn not in mine:
            return
        del mine[conn]
        self._resize(peer, len(mine) + 1, len(mine))
        if not mine:
            del self._evictable[peer]

    def _resize(self, peer: str, old: int, new: int) -> None:
        if old:
            peers = self._by_size[old]
            del peers[peer]
            if not peers:
                del self._by_size[old]
        if new:
            self._by_size.setdefault(new, {})[peer] = None
        if new > self._most:
            self._most = new
        elif old == self._most and old not in self._by_size:
            self._most = new  # sizes move by one: the largest is now the one just left
