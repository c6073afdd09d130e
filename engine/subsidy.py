"""Subsidies: crediting holders' subsidy purses from the school's fund, and the month-end
clear-down of what was not spent.

Command line::

    onecard subsidy --file F.csv [--ledger L] [--batch-id ID]
    onecard subsidy --clear-down --month YYYY-MM --ledger L

**The file** is UTF-8 CSV with a header row naming the columns ``holder_id`` and
``amount_fen`` (a positive integer of fen) and, optionally, ``ledger`` (per row; otherwise
``--ledger`` applies to every row). Other columns (a name, a class) are ignored. A holder may
appear once per ledger in a file; a malformed file is refused as a whole before anything is
posted (exit 2).

**Idempotency**: each row's transfer id is ``uuid5(SUBSIDY_NAMESPACE, "grant/ledger/batch/
holder")``; the batch id is ``--batch-id`` or, when absent, derived from the file's content
(``file-`` + the first 16 hex digits of its SHA-256). Running the same file again credits
nobody twice. A recurring file with identical content (the same amount for the same students
every month) must therefore be given a ``--batch-id`` per run, e.g. the month.

Every credit is a code 5 transfer from the ledger's ``fund`` account (kind ``fund``, a
deterministic id) to the holder's subsidy purse, submitted in chunks through the batcher like
any other transfer. A progress bar runs on stderr and a summary table (count and fen per
status) is printed at the end; exit 0 when every row is credited (now or before), 1 when any is
not (unknown holder, refused transfer).

**The fund is never created here** (nor by ``POST /v1/subsidies``): it is created with the
ledger's holders (``Campus.create_holder``; migration 0005 added it to ledgers whose holders
predate that). A subsidy names a ledger and a holder, both of which may be made up; creating
the fund of any ledger named would let one request of 8,190 items leave 8,190 accounts (and
ledger clocks) behind. So a row whose holder does not exist answers ``holder_not_found``, and a
row whose ledger has no fund ``fund_not_found``; neither writes anything.

**Clear-down** (opt-in per campus: run it, from a month-end job, for the ledgers whose subsidy
lapses) returns every subsidy purse's unused subsidy to the fund as a code 5 transfer in the
opposite direction, so the fund's code 5 flow nets grants minus returns. "Unused" is the
purse's balance at the end of the month (campus time, ``ONECARD_TZ``), capped by what it has
available now: next month's grant, if it was already credited, is not taken back. Transfer ids
are ``uuid5(SUBSIDY_NAMESPACE, "clear-down/ledger/month/account")``: a second run for the same
month returns nothing twice. A month not yet over is cleared as of now. A frozen purse (lost
card) cannot be debited; it is reported and can be cleared by a later run once unfrozen.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Final
from uuid import UUID, uuid5
from zoneinfo import ZoneInfo

import msgspec

from engine import limits
from engine.batcher import TransferResult, ledger_groups
from engine.campus import DEFAULT_TZ, fund_account_id
from engine.cli import command, subcommand
from engine.service import Engine
from engine.store import Store
from ledger.status import TransferStatus
from ledger.transfer import Transfer
from ledger.types import INT32_MAX, INT64_MAX, TransferCode, TransferFlags

SUBSIDY_NAMESPACE: Final = UUID("6f1c0a52-3d1e-4b7a-9c55-0d5e1a7b2c10")
SUBSIDY_CHUNK: Final = 1000  # transfers per batcher submission
MAX_BATCH_ID_LEN: Final = 64

_NOT_POSTED: Final = int(TransferFlags.PENDING | TransferFlags.VOID_PENDING)
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

# Holders' subsidy purses, for many (ledger, holder) pairs at once.
SQL_SUBSIDY_PURSES = """
SELECT h.ledger, h.id, h.subsidy_account_id
FROM holders h JOIN unnest($1::int[], $2::text[]) AS x(ledger, id)
  ON h.ledger = x.ledger AND h.id = x.id
"""
SQL_LEDGER_CLOCK = "SELECT last_timestamp FROM ledgers WHERE ledger = $1"
# Which of these (ledger, fund account id) pairs exist as the ledger's fund.
SQL_FUNDS = """
SELECT a.ledger FROM accounts a JOIN unnest($1::int[], $2::bigint[]) AS x(ledger, id)
  ON a.id = x.id AND a.ledger = x.ledger
WHERE a.kind = 'fund'
"""
# Every subsidy purse of a ledger: available now, and its posted balance at $2 (the balance
# now less what posted after $2; holds never count as posted).
SQL_SUBSIDY_LEFT = f"""
WITH after AS (
    SELECT t.debit_account_id, t.credit_account_id, t.amount FROM transfers t
    WHERE t.ledger = $1 AND t.timestamp > $2 AND t.flags & {_NOT_POSTED} = 0
), moved AS (
    SELECT id, sum(delta)::bigint AS delta FROM (
        SELECT credit_account_id AS id, amount AS delta FROM after
        UNION ALL
        SELECT debit_account_id, -amount FROM after
    ) m GROUP BY id
)
SELECT a.id, a.holder_id,
       a.credits_posted - a.debits_posted - a.debits_pending AS available,
       a.credits_posted - a.debits_posted - coalesce(moved.delta, 0) AS month_end
FROM accounts a LEFT JOIN moved ON moved.id = a.id
WHERE a.ledger = $1 AND a.kind = 'subsidy'
ORDER BY a.id
"""
SQL_EXISTING = "SELECT id, amount FROM transfers WHERE ledger = $1 AND id = ANY($2::uuid[])"


HOLDER_NOT_FOUND: Final = "holder_not_found"
FUND_NOT_FOUND: Final = "fund_not_found"


class FundMissing(ValueError):
    """The ledger has no subsidy fund (it is created with the ledger's holders)."""


class Grant(msgspec.Struct, frozen=True):
    """One subsidy to credit."""

    ledger: int
    holder_id: str
    amount: int
    batch_id: str


class GrantResult(msgspec.Struct, frozen=True):
    """What became of one grant: a transfer status, ``holder_not_found`` or
    ``fund_not_found``."""

    ledger: int
    holder_id: str
    id: UUID
    amount: int
    status: str
    timestamp: int | None = None

    @property
    def ok(self) -> bool:
        """Credited, now or by an earlier run."""
        return self.status in (TransferStatus.CREATED, TransferStatus.EXISTS)


class ClearDownResult(msgspec.Struct, frozen=True):
    """What became of one subsidy purse's clear-down."""

    account_id: int
    holder_id: str | None
    id: UUID
    amount: int
    status: TransferStatus
    timestamp: int | None = None


def grant_transfer_id(ledger: int, batch_id: str, holder_id: str) -> UUID:
    """Transfer id of a holder's subsidy in a batch: the same batch credits nobody twice."""
    return uuid5(SUBSIDY_NAMESPACE, f"grant/{ledger}/{batch_id}/{holder_id}")


def clear_down_transfer_id(ledger: int, month: str, account_id: int) -> UUID:
    """Transfer id of a purse's clear-down for a month: one per purse and month."""
    return uuid5(SUBSIDY_NAMESPACE, f"clear-down/{ledger}/{month}/{account_id}")


async def funded(store: Store, ledgers: Sequence[int]) -> set[int]:
    """Which of ``ledgers`` have their subsidy fund account (one read; creates nothing)."""
    ledgers = sorted(set(ledgers))
    if not ledgers:
        return set()
    async with store.pool.acquire() as conn:
        rows = await conn.fetch(SQL_FUNDS, ledgers, [fund_account_id(x) for x in ledgers])
    return {r["ledger"] for r in rows}


async def grant_subsidies(
    engine: Engine,
    grants: Sequence[Grant],
    *,
    on_progress: Callable[[int], None] | None = None,
) -> list[GrantResult]:
    """Credit each grant's holder's subsidy purse from its ledger's fund (code 5); results in
    input order. Chunks of ``SUBSIDY_CHUNK`` go through the batcher; ``on_progress`` hears how
    many grants each chunk settled. Nothing but the credits is written: an unknown holder
    answers ``holder_not_found``, a ledger without a fund ``fund_not_found``."""
    results: list[GrantResult] = []
    for start in range(0, len(grants), SUBSIDY_CHUNK):
        chunk = grants[start : start + SUBSIDY_CHUNK]
        async with engine.store.pool.acquire() as conn:
            rows = await conn.fetch(SQL_SUBSIDY_PURSES, [g.ledger for g in chunk],
                                    [g.holder_id for g in chunk])
        purses = {(r["ledger"], r["id"]): r["subsidy_account_id"] for r in rows}
        funds = await funded(engine.store, [ledger for ledger, _ in purses])
        refused = [
            HOLDER_NOT_FOUND if (g.ledger, g.holder_id) not in purses
            else None if g.ledger in funds else FUND_NOT_FOUND
            for g in chunk
        ]
        transfers = [
            Transfer(id=grant_transfer_id(g.ledger, g.batch_id, g.holder_id), ledger=g.ledger,
                     debit_account_id=fund_account_id(g.ledger),
                     credit_account_id=purses[(g.ledger, g.holder_id)], amount=g.amount,
                     code=TransferCode.SUBSIDY, user_data=f"subsidy {g.batch_id}")
            for g, why in zip(chunk, refused, strict=True)
            if why is None
        ]
        answers = iter(await _submit(engine, transfers))
        for g, why in zip(chunk, refused, strict=True):
            tid = grant_transfer_id(g.ledger, g.batch_id, g.holder_id)
            if why is None:
                a = next(answers)
                results.append(GrantResult(g.ledger, g.holder_id, tid, g.amount, str(a.status),
                                           a.timestamp))
            else:
                results.append(GrantResult(g.ledger, g.holder_id, tid, g.amount, why))
        if on_progress is not None:
            on_progress(len(chunk))
    return results


async def _submit(engine: Engine, transfers: list[Transfer]) -> list[TransferResult]:
    """Submit in requests the batcher accepts: a chunk may span more ledgers than one request
    may name (``limits.MAX_LEDGER_GROUPS_PER_REQUEST``); grant ids differ per ledger, so a
    request's ledger groups are its ledgers. Answers in order."""
    out: list[TransferResult] = []
    part: list[Transfer] = []
    ledgers: set[int] = set()
    for t in transfers:
        if t.ledger not in ledgers and len(ledgers) == limits.MAX_LEDGER_GROUPS_PER_REQUEST:
            out.extend(await engine.batcher.submit(part))
            part, ledgers = [], set()
        part.append(t)
        ledgers.add(t.ledger)
    if part:
        assert ledger_groups(part) <= limits.MAX_LEDGER_GROUPS_PER_REQUEST
        out.extend(await engine.batcher.submit(part))
    return out


def month_bounds(month: str, tz: ZoneInfo) -> tuple[int, int]:
    """[start, end) of a campus-local month ``YYYY-MM`` in engine ns; ValueError if malformed."""
    try:
        first = datetime.strptime(month, "%Y-%m").date()
    except ValueError:
        raise ValueError(f"--month must be YYYY-MM, not {month!r}") from None
    nxt = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return _ns(datetime.combine(first, dtime(0), tzinfo=tz)), _ns(
        datetime.combine(nxt, dtime(0), tzinfo=tz)
    )


def _ns(dt: datetime) -> int:
    return (dt - EPOCH) // timedelta(microseconds=1) * 1000


async def clear_down(
    engine: Engine,
    ledger: int,
    month: str,
    *,
    tz: str = DEFAULT_TZ,
    on_total: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> list[ClearDownResult]:
    """Return every subsidy purse's unused subsidy of ``month`` to the fund (see the module
    docstring). Purses with nothing to return are left out; purses already cleared for the
    month answer ``exists``."""
    start, end = month_bounds(month, ZoneInfo(tz))
    if start > _ns(datetime.now(UTC)):
        raise ValueError(f"month {month} has not begun")
    if ledger not in await funded(engine.store, [ledger]):
        raise FundMissing(f"ledger {ledger} has no subsidy fund (it is created with the "
                          "ledger's holders)")
    fund = fund_account_id(ledger)
    async with engine.store.pool.acquire() as conn:
        clock = await conn.fetchval(SQL_LEDGER_CLOCK, ledger) or 0
        cut = min(end - 1, clock)
        purses = await conn.fetch(SQL_SUBSIDY_LEFT, ledger, cut)
        ids = {r["id"]: clear_down_transfer_id(ledger, month, r["id"]) for r in purses}
        done = {r["id"]: r["amount"]
                for r in await conn.fetch(SQL_EXISTING, ledger, list(ids.values()))}
    results: list[ClearDownResult] = []
    todo: list[ClearDownResult] = []
    for r in purses:
        tid = ids[r["id"]]
        if tid in done:
            results.append(ClearDownResult(r["id"], r["holder_id"], tid, done[tid],
                                           TransferStatus.EXISTS))
            continue
        amount = min(r["month_end"], r["available"])
        if amount > 0:
            todo.append(ClearDownResult(r["id"], r["holder_id"], tid, amount,
                                        TransferStatus.CREATED))
    if on_total is not None:
        on_total(len(todo))
    for i in range(0, len(todo), SUBSIDY_CHUNK):
        chunk = todo[i : i + SUBSIDY_CHUNK]
        answers = await engine.batcher.submit([
            Transfer(id=c.id, ledger=ledger, debit_account_id=c.account_id,
                     credit_account_id=fund, amount=c.amount, code=TransferCode.SUBSIDY,
                     user_data=f"clear-down {month}")
            for c in chunk
        ])
        results.extend(msgspec.structs.replace(c, status=a.status, timestamp=a.timestamp)
                       for c, a in zip(chunk, answers, strict=True))
        if on_progress is not None:
            on_progress(len(chunk))
    return results


# -- the file ----------------------------------------------------------------------------------


class FileError(ValueError):
    """The subsidy file is malformed; nothing was posted."""


def read_grants(
    data: bytes, *, ledger: int | None, batch_id: str | None
) -> tuple[str, list[Grant]]:
    """Parse a subsidy file (see the module docstring); returns (batch id, grants)."""
    batch = batch_id or "file-" + hashlib.sha256(data).hexdigest()[:16]
    if not 0 < len(batch) <= MAX_BATCH_ID_LEN:
        raise FileError(f"the batch id must have 1..{MAX_BATCH_ID_LEN} characters")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FileError(f"not UTF-8: {e}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = set(reader.fieldnames or ())
    missing = {"holder_id", "amount_fen"} - columns
    if missing:
        raise FileError(f"the header lacks {', '.join(sorted(missing))}")
    if "ledger" not in columns and ledger is None:
        raise FileError("no ledger column: give --ledger")
    grants: list[Grant] = []
    seen: set[tuple[int, str]] = set()
    for n, row in enumerate(reader, start=2):
        holder = (row.get("holder_id") or "").strip()
        raw_amount = (row.get("amount_fen") or "").strip()
        raw_ledger = (row.get("ledger") or "").strip()
        if not 0 < len(holder) <= 64:
            raise FileError(f"line {n}: holder_id must have 1..64 characters")
        if not raw_amount.isdigit() or not 0 < int(raw_amount) <= INT64_MAX:
            raise FileError(f"line {n}: amount_fen must be a positive integer, not {raw_amount!r}")
        if raw_ledger:
            if not raw_ledger.isdigit() or not 0 < int(raw_ledger) <= INT32_MAX:
                raise FileError(f"line {n}: bad ledger {raw_ledger!r}")
            row_ledger = int(raw_ledger)
        elif ledger is not None:
            row_ledger = ledger
        else:
            raise FileError(f"line {n}: no ledger (empty cell and no --ledger)")
        if (row_ledger, holder) in seen:
            raise FileError(f"line {n}: holder {holder!r} appears twice in ledger {row_ledger}")
        seen.add((row_ledger, holder))
        grants.append(Grant(row_ledger, holder, int(raw_amount), batch))
    return batch, grants


# -- command line ------------------------------------------------------------------------------


@subcommand("subsidy", "credit subsidy purses from a CSV file, or clear unused subsidy down")
def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file", type=Path, help="CSV: holder_id,amount_fen[,ledger]")
    p.add_argument("--ledger", type=int, help="ledger of rows without a ledger column")
    p.add_argument("--batch-id", help="idempotency id of this run (default: from the content)")
    p.add_argument("--clear-down", action="store_true",
                   help="return unused subsidy of --month to the fund")
    p.add_argument("--month", help="YYYY-MM (campus time) for --clear-down")
    p.add_argument("--tz", default=os.environ.get("ONECARD_TZ") or DEFAULT_TZ,
                   help="campus time zone (default $ONECARD_TZ or Asia/Shanghai)")


@command("subsidy")
async def run(args: argparse.Namespace, dsn: str) -> int:
    """``onecard subsidy``: exit 0 all done, 1 some rows not credited, 2 bad input."""
    from rich.console import Console

    err = Console(stderr=True)
    if bool(args.file) == bool(args.clear_down):
        err.print("onecard subsidy: give either --file F.csv or --clear-down --month YYYY-MM")
        return 2
    if args.clear_down and (not args.month or args.ledger is None):
        err.print("onecard subsidy --clear-down needs --month YYYY-MM and --ledger L")
        return 2
    grants: list[Grant] = []
    if args.file:
        try:
            batch, grants = read_grants(args.file.read_bytes(), ledger=args.ledger,
                                        batch_id=args.batch_id)
        except (OSError, FileError) as e:
            err.print(f"onecard subsidy: {args.file}: {e}")
            return 2
    else:
        try:
            month_bounds(args.month, ZoneInfo(args.tz))
        except ValueError as e:
            err.print(f"onecard subsidy: {e}")
            return 2
    engine = Engine(dsn)
    await engine.start()
    try:
        if args.file:
            return await _run_grants(engine, grants, batch)
        return await _run_clear_down(engine, args.ledger, args.month, args.tz)
    except FundMissing as e:
        err.print(f"onecard subsidy: {e}")
        return 2
    finally:
        await engine.stop()


async def _run_grants(engine: Engine, grants: list[Grant], batch: str) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True)) as progress:
        task = progress.add_task(f"subsidy {batch}", total=len(grants))
        results = await grant_subsidies(
            engine, grants, on_progress=lambda n: progress.advance(task, n)
        )
    _summary(f"subsidy batch {batch}", [(r.status, r.amount) for r in results])
    return 0 if all(r.ok for r in results) else 1


async def _run_clear_down(engine: Engine, ledger: int, month: str, tz: str) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True)) as progress:
        task = progress.add_task(f"clear-down {month}", total=None)
        results = await clear_down(
            engine, ledger, month, tz=tz,
            on_total=lambda n: progress.update(task, total=n),
            on_progress=lambda n: progress.advance(task, n),
        )
    _summary(f"clear-down {month}, ledger {ledger}",
             [(str(r.status), r.amount) for r in results])
    return 0 if all(r.status.ok for r in results) else 1


def _summary(title: str, rows: list[tuple[str, int]]) -> None:
    from rich.console import Console
    from rich.table import Table

    count: Counter[str] = Counter()
    fen: Counter[str] = Counter()
    for status, amount in rows:
        count[status] += 1
        fen[status] += amount
    table = Table(title=title)
    table.add_column("status")
    table.add_column("rows", justify="right")
    table.add_column("amount_fen", justify="right")
    for status in sorted(count):
        table.add_row(status, str(count[status]), str(fen[status]))
    table.add_row("total", str(sum(count.values())), str(sum(fen.values())), style="bold")
    Console(file=sys.stdout, width=100).print(table)
