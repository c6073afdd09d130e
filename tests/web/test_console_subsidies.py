"""The console's subsidy month (contract §8): upload, a preview that moves nothing and lists the
rows that would be refused, confirm (the same idempotent batch as ``onecard subsidy``), and a
second upload of the same file credits nobody twice."""

from __future__ import annotations

import re

import asyncpg
import httpx
import pytest

from engine.access import oplog
from engine.access.roles import Role
from engine.campus.accounts import holder_account_ids
from engine.campus.subsidies import grant_transfer_id
from engine.campus.subsidy_preview import batch_of
from tests.web.conftest import WebServer, csrf_of, parse
from tests.web.test_console import (  # noqa: F401  (fixtures)
    console_as,
    new_holder,
    operators_login,
    pool,
)


async def _subsidy_credits(db: asyncpg.Pool, ledger: int, hid: str) -> int:
    _, subsidy = holder_account_ids(ledger, hid)
    async with db.acquire() as conn:
        return int(await conn.fetchval(
            "SELECT credits_posted FROM accounts WHERE ledger = $1 AND id = $2", ledger, subsidy))


async def _upload(client: httpx.AsyncClient, data: bytes, ledger: str = "") -> httpx.Response:
    page = await client.get("/console/subsidies")
    assert page.status_code == 200 and 'id="upload-form"' in page.text
    return await client.post(
        "/console/subsidies/preview",
        data={"csrf": csrf_of(page.text), "ledger": ledger},
        files={"file": ("subsidies.csv", data, "text/csv")},
    )


async def _confirm(client: httpx.AsyncClient, preview: httpx.Response,
                   **override: str) -> httpx.Response:
    fields = {name: value for name, value in re.findall(
        r'<input type="hidden" name="([^"]+)" value="([^"]*)"', preview.text.split(
            'id="confirm-form"')[1].split("</form>")[0])}
    return await client.post("/console/subsidies/confirm", data={**fields, **override})


def _count(html: str, status: str) -> int:
    m = re.search(rf'<tr data-status="{status}" data-count="(\d+)"', html)
    return int(m.group(1)) if m else 0


async def test_upload_preview_confirm_and_nothing_twice(
    web: WebServer, pool: asyncpg.Pool, operators_login: None  # noqa: F811
) -> None:
    (l1, h1), (l2, h2) = await new_holder(web), await new_holder(web)
    data = (f"ledger,holder_id,amount_fen,name\n{l1},{h1},500,a\n{l2},{h2},1250,b\n"
            f"{l1},nobody-{h1},300,c\n").encode()
    async with console_as(web, pool, Role.CARD_OFFICE) as (client, clerk):
        pre = await _upload(client, data)
        assert pre.status_code == 200, pre.text
        assert parse(pre.text).ids["preview"]["tag"] == "table"
        assert parse(pre.text).ids["preview-total"]["data-fen"] == "1750"
        assert _count(pre.text, "credit") == 2 and _count(pre.text, "holder_not_found") == 1
        assert re.search(r'<tr data-line="4" data-holder-id="nobody-[^"]+" '
                         r'data-reason="holder_not_found"', pre.text)
        assert 'id="confirm"' in pre.text
        assert await _subsidy_credits(pool, l1, h1) == 0  # the preview moved nothing
        done = await _confirm(client, pre)
        assert done.status_code == 200 and 'data-status="partial"' in done.text, done.text
        assert _count(done.text, "created") == 2 and _count(done.text, "holder_not_found") == 1
        assert parse(done.text).ids["granted-total"]["data-fen"] == "1750"
        assert (await _subsidy_credits(pool, l1, h1), await _subsidy_credits(pool, l2, h2)) \
            == (500, 1250)
        # the same batch as `onecard subsidy --file` (its transfer ids)
        async with pool.acquire() as conn:
            tid = grant_transfer_id(l1, batch_of(data), h1)
            assert await conn.fetchval("SELECT amount FROM transfers WHERE id = $1", tid) == 500
        again = await _upload(client, data)
        assert _count(again.text, "already") == 2
        twice = await _confirm(client, again)
        assert _count(twice.text, "exists") == 2 and _count(twice.text, "created") == 0
        assert parse(twice.text).ids["granted-total"]["data-fen"] == "0"
        assert (await _subsidy_credits(pool, l1, h1), await _subsidy_credits(pool, l2, h2)) \
            == (500, 1250)
    async with pool.acquire() as conn:
        entries, _ = await oplog.page(conn, limit=200, before=None)
    mine = [(e.action, e.outcome) for e in entries if e.actor == clerk]
    assert list(reversed(mine)) == [
        ("console subsidy", "created=2 holder_not_found=1"),
        ("console subsidy", "exists=2 holder_not_found=1"),
    ]


async def test_a_malformed_file_lists_its_rows_and_cannot_be_confirmed(
    web: WebServer, pool: asyncpg.Pool, operators_login: None  # noqa: F811
) -> None:
    ledger, hid = await new_holder(web)
    data = f"holder_id,amount_fen\n{hid},12.50\n{hid},100\n".encode()
    async with console_as(web, pool, Role.ADMIN) as (client, _):
        pre = await _upload(client, data, ledger=str(ledger))
        assert pre.status_code == 200
        assert re.search(r'<tr data-line="2" [^>]*data-reason="bad_amount"', pre.text)
        assert 'id="confirm"' not in pre.text and 'id="malformed"' in pre.text
        unreadable = await _upload(client, b"name,amount\nx,1\n")
        assert unreadable.status_code == 400 and 'id="error"' in unreadable.text
    assert await _subsidy_credits(pool, ledger, hid) == 0


async def test_a_confirm_of_other_bytes_than_the_preview_s_is_refused(
    web: WebServer, pool: asyncpg.Pool, operators_login: None  # noqa: F811
) -> None:
    import base64

    ledger, hid = await new_holder(web)
    data = f"ledger,holder_id,amount_fen\n{ledger},{hid},100\n".encode()
    forged = base64.urlsafe_b64encode(
        f"ledger,holder_id,amount_fen\n{ledger},{hid},999999\n".encode()).decode()
    async with console_as(web, pool, Role.CARD_OFFICE) as (client, _):
        pre = await _upload(client, data)
        r = await _confirm(client, pre, content=forged)
        assert r.status_code == 400 and 'id="error"' in r.text
    async with console_as(web, pool, Role.CARD_OFFICE) as (other, _):  # another session
        page = await other.get("/console/subsidies")
        r = await _confirm(other, pre, csrf=csrf_of(page.text))
        assert r.status_code == 400
    assert await _subsidy_credits(pool, ledger, hid) == 0


@pytest.mark.parametrize("role", [Role.FINANCE, Role.AUDITOR])
async def test_subsidies_are_refused_to_other_roles(
    web: WebServer, pool: asyncpg.Pool, operators_login: None, role: Role  # noqa: F811
) -> None:
    ledger, hid = await new_holder(web)
    async with console_as(web, pool, role) as (client, _):
        assert (await client.get("/console/subsidies")).status_code == 403
        home = await client.get("/console/log" if role is Role.AUDITOR else "/console/finance")
        r = await client.post(
            "/console/subsidies/preview", data={"csrf": csrf_of(home.text)},
            files={"file": ("s.csv", f"ledger,holder_id,amount_fen\n{ledger},{hid},1\n".encode())})
        assert r.status_code == 403


async def test_a_campus_sized_file_goes_through_preview_and_confirm(
    web: WebServer, pool: asyncpg.Pool, operators_login: None  # noqa: F811
) -> None:
    """40,000 rows (a campus's month, ~1.3 MB): the preview lists a bounded number of refused
    rows, counts all, and the confirm form carries the file back within the body limit."""
    ledger, hid = await new_holder(web)
    rows = "".join(f"{ledger},gone-{i:06d}-{hid},1000\n" for i in range(40_000))
    data = f"ledger,holder_id,amount_fen\n{ledger},{hid},1000\n{rows}".encode()
    assert len(data) > 1_000_000
    async with console_as(web, pool, Role.CARD_OFFICE) as (client, _):
        pre = await _upload(client, data)
        assert pre.status_code == 200
        assert _count(pre.text, "holder_not_found") == 40_000 and _count(pre.text, "credit") == 1
        assert pre.text.count('data-reason="holder_not_found"') == 200  # the listed ones
        done = await _confirm(client, pre)
        assert done.status_code == 200, done.text[:500]
        assert _count(done.text, "created") == 1 and _count(done.text, "holder_not_found") == 40_000
    assert await _subsidy_credits(pool, ledger, hid) == 1000
