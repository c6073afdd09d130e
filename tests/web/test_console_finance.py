"""The console's finance page (contract §8): the day's four files are the bytes of ``onecard
export`` (and ``bean-check`` accepts the beancount one), the trial balance is on the page, and
a statement is reconciled (a malformed one answers its line number in the page's language)."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path
from typing import Final

import asyncpg
import httpx
import pytest

from engine.access.roles import Role
from engine.calendar import campus_tz
from engine.campus.accounts import holder_account_ids
from tests.web.conftest import WebServer, csrf_of
from tests.web.own_database import own_dsn, own_web  # noqa: F401  (this module's database)
from tests.web.test_console import (  # noqa: F401  (fixtures)
    ADMIN,
    console_as,
    new_holder,
    operators_login,
    pool,
)

ROOT: Final = Path(__file__).resolve().parents[2]
BIN: Final = Path(sys.executable).parent
CLI: Final = "import sys; from engine.cli import main; sys.exit(main())"
FILES: Final = {
    "settlement": "settlement-{d}.csv",
    "trial-balance": "trial-balance-{d}.csv",
    "journal": "journal-{d}.csv",
    "beancount": "journal-{d}.beancount",
}


async def _top_ups(web: WebServer) -> tuple[int, str]:
    """A clearing account, a holder, and two top-ups (refs r1: 100.00, r2: 20.00) today."""
    ledger, hid = await new_holder(web)
    clearing = 8_000_000_000 + secrets.randbelow(10**9)
    tag = secrets.token_hex(4)
    async with httpx.AsyncClient(base_url=web.base_url, timeout=30) as api:
        r = await api.post("/v1/accounts", headers=ADMIN, json=[
            {"id": clearing, "ledger": ledger, "kind": "clearing", "code": 1}])
        assert r.status_code == 200, r.text
        purse, _ = holder_account_ids(ledger, hid)
        for ref, amount in ((f"{tag}-r1", 10_000), (f"{tag}-r2", 2_000)):
            r = await api.post("/v1/transfers", headers=ADMIN, json=[{
                "id": str(uuid.uuid4()), "ledger": ledger, "debit_account_id": clearing,
                "credit_account_id": purse, "amount": amount, "code": 4, "user_data": ref}])
            assert r.status_code == 200 and r.json()[0]["status"] == "created", r.text
    return clearing, tag


def _cli_export(dsn: str, day: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CLI, "export", "--date", day, "--out", str(out), "--dsn", dsn],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


async def test_the_day_s_files_are_the_cli_s_and_bean_check_passes(
    web: WebServer, pool: asyncpg.Pool, operators_login: None, dsn: str, tmp_path: Path  # noqa: F811
) -> None:
    await _top_ups(web)
    day = datetime.now(campus_tz()).date().isoformat()
    async with console_as(web, pool, Role.FINANCE) as (client, _):
        page = await client.get("/console/finance", params={"date": day})
        assert page.status_code == 200 and 'id="trial-balance"' in page.text
        assert re.search(r'<tr data-kind="clearing">', page.text)
        links = dict(re.findall(r'<a data-file="([^"]+)" href="([^"]+)"', page.text))
        assert sorted(links) == sorted(FILES)
        got = {}
        for name, href in links.items():
            r = await client.get(href.replace("&amp;", "&"))
            assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
            got[name] = r.content
    cli = await asyncio.to_thread(_cli_export, dsn, day, tmp_path)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    for name, pattern in FILES.items():
        assert got[name] == (tmp_path / pattern.format(d=day)).read_bytes(), name
    bean = tmp_path / "downloaded.beancount"
    bean.write_bytes(got["beancount"])
    ok = await asyncio.to_thread(
        subprocess.run, [str(BIN / "bean-check"), str(bean)], capture_output=True, text=True,
        timeout=120, check=False,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr


async def _reconcile(client: httpx.AsyncClient, day: str, clearing: int, text: str,
                     lang: str = "zh-CN") -> httpx.Response:
    page = await client.get("/console/finance", params={"lang": lang})
    return await client.post(
        "/console/finance/reconcile",
        data={"csrf": csrf_of(page.text), "date": day, "clearing": str(clearing)},
        files={"statement": ("statement.csv", text.encode(), "text/csv")},
    )


async def test_reconcile_a_statement_with_a_mismatch(
    web: WebServer, pool: asyncpg.Pool, operators_login: None  # noqa: F811
) -> None:
    clearing, tag = await _top_ups(web)
    now = datetime.now(campus_tz())
    day, at = now.date().isoformat(), now.isoformat()
    statement = (f"provider_ref,amount_fen,time\n{tag}-r1,10000,{at}\n{tag}-r2,2500,{at}\n"
                 f"{tag}-r3,700,{at}\n")
    async with console_as(web, pool, Role.AUDITOR) as (client, _):
        r = await _reconcile(client, day, clearing, statement)
    assert r.status_code == 200 and 'id="reconcile"' in r.text, r.text
    results = {ref: result for result, ref in
               re.findall(r'<tr data-result="([^"]+)" data-provider-ref="([^"]+)"', r.text)}
    assert results == {f"{tag}-r1": "matched", f"{tag}-r2": "amount_mismatch",
                       f"{tag}-r3": "missing_in_ledger"}


@pytest.mark.parametrize(("lang", "words"), [("zh-CN", "第 3 行"), ("en", "Line 3")])
async def test_a_malformed_statement_answers_its_line(
    web: WebServer, pool: asyncpg.Pool, operators_login: None, lang: str, words: str  # noqa: F811
) -> None:
    clearing, tag = await _top_ups(web)
    now = datetime.now(campus_tz())
    statement = (f"provider_ref,amount_fen,time\n{tag}-r1,10000,{now.isoformat()}\n"
                 f"{tag}-r2,12.50,{now.isoformat()}\n")
    async with console_as(web, pool, Role.FINANCE) as (client, _):
        r = await _reconcile(client, now.date().isoformat(), clearing, statement, lang)
    assert r.status_code == 400 and 'id="error"' in r.text
    error = re.search(r'id="error"[^>]*>([^<]+)<', r.text)
    assert error and words in error.group(1), r.text
    assert '<table id="reconcile"' not in r.text


@pytest.mark.parametrize(("role", "status"), [
    (Role.ADMIN, 200), (Role.AUDITOR, 200), (Role.FINANCE, 200), (Role.CARD_OFFICE, 403),
])
async def test_the_finance_page_is_for_finance_roles(
    web: WebServer, pool: asyncpg.Pool, operators_login: None, role: Role, status: int  # noqa: F811
) -> None:
    async with console_as(web, pool, role) as (client, _):
        assert (await client.get("/console/finance")).status_code == status
        r = await client.get("/console/finance/files/journal", params={"date": "2024-01-01"})
        assert r.status_code == status
