"""`onecard serve` as one process with both doors (HTTP and ISO 8583) over one Campus.

A card changed over HTTP must be seen at the very next swipe on the terminal gateway. The
server shares one Campus between the doors so that any card or terminal cache the campus keeps
is invalidated by the same instance that makes the change.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from terminals.client import TerminalClient
from terminals.iso8583 import ResponseCode
from tests.faults.harness import ADMIN, open_campus, running_server, scratch_database


async def test_a_card_replaced_over_http_is_refused_at_the_next_swipe(
    admin_dsn: str, tmp_path: Path
) -> None:
    async with (
        scratch_database(admin_dsn) as dsn,
        running_server(dsn, tmp_path / "serve.log", iso=True) as server,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as http,
    ):
        campus = await open_campus(http, 7, terminals=1, holders=1)
        pos, holder = campus.terminals[0], campus.holders[0]
        assert server.iso_port is not None
        async with TerminalClient(
            "127.0.0.1",
            server.iso_port,
            terminal_id=pos.terminal_id,
            merchant_id=pos.merchant_id,
            mac_key=pos.key,
        ) as term:
            first = await term.request(term.purchase(holder.card_no, 100))
            assert first.response_code == ResponseCode.APPROVED  # the gateway now knows the card
            r = await http.post(f"/v1/cards/{holder.card_no}/report-lost", headers=ADMIN)
            assert r.status_code == 200 and r.json()["status"] == "lost", r.text
            second = await term.request(term.purchase(holder.card_no, 100))
            assert second.response_code == ResponseCode.LOST_CARD
            # The replacement unfreezes the purses: only the card's own state now stops the old
            # (stolen) card, so a stale card state at the gateway would approve it.
            new_card = "9" + holder.card_no[1:]
            r = await http.post(
                f"/v1/cards/{holder.card_no}/replace", headers=ADMIN, json={"new_card_no": new_card}
            )
            assert r.status_code == 200 and r.json()["new"]["status"] == "active", r.text
            third = await term.request(term.purchase(holder.card_no, 100))
            assert third.response_code == ResponseCode.CARD_NOT_ACTIVE
            fourth = await term.request(term.purchase(new_card, 100))
            assert fourth.response_code == ResponseCode.APPROVED
