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

import csv
import hashlib
import io
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Final
from uuid import UUID, uuid5

import msgspec

from engine import limits
from engine.calendar import campus_tz, month_window, parse_month, to_ns
from engine.campus.accounts import fund_account_id
from engine.grouping import TransferResult, ledger_groups
from engine.service import Engine
from engine.store import Store
from ledger.status import TransferStatus
from ledger.transfer import USER_DATA_MAX_BYTES, Transfer
from ledger.types import (
    INT32_MAX,
    INT64_MAX,
    UNPOSTED_FLAGS,
    TransferCode,
)

SUBSIDY_NAMESPACE: Final = UUID("6f1c0a52-3d1e-4b7a-9c55-0d5e1a7b2c10")
MAX_BATCH_ID_LEN: Final = 64  # characters
_USER_DATA_PREFIX: Final = "subsidy "
# Every grant's user_data is "subsidy <batch id>" and holds USER_DATA_MAX_BYTES: a batch id of
# 64 four-byte characters would not fit.
MAX_BATCH_ID_BYTES: Final = USER_DATA_MAX_BYTES - len(_USER_DATA_PREFIX)
MAX_HOLDER_ID_LEN: Final = 64  # the holders table's CHECK


# Holders' subsidy purses, for many (ledger, holder) pairs at once.
SQL_SUBSIDY_PURSES = """
SELECT h.ledger, h.id, h.subsidy_account_id
FROM holders h JOIN unnest($1::int[], $2::text[]) AS x(ledger, id)
  ON h.ledger = x.ledger AND h.id = x.id
"""
SQL_LEDGER_CLOCK = "SELECT last_timestamp FROM ledgers WHERE ledger = $1"
# Every subsidy purse of a ledger: available now, and its posted balance at $2 (the balance
# now less what posted after $2; holds never count as posted).
SQL_SUBSIDY_LEFT = f"""
WITH after AS (
    SELECT t.debit_account_id, t.credit_account_id, t.amount FROM transfers t
    WHERE t.ledger = $1 AND t.timestamp > $2 AND t.flags & {UNPOSTED_FLAGS} = 0
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
# Which of these (ledger, fund account id) pairs exist as the ledger's fund.
SQL_FUNDS = """
SELECT a.ledger FROM accounts a JOIN unnest($1::int[], $2::bigint[]) AS x(ledger, id)
  ON a.id = x.id AND a.ledger = x.ledger
WHERE a.kind = 'fund'
"""


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


def grant_problem(g: Grant) -> str | None:
    """What makes a grant impossible to post (None: nothing). Checked for every grant before
    any is submitted: a value PostgreSQL refuses (U+0000 in text) would fail the whole
    group-committed batch, other clients' transfers included."""
    if not 0 < g.ledger <= INT32_MAX:
        return f"ledger must be in 1..{INT32_MAX}"
    if not 0 < g.amount <= INT64_MAX:
        return f"amount must be in 1..{INT64_MAX}"
    if not 0 < len(g.holder_id) <= MAX_HOLDER_ID_LEN or "\x00" in g.holder_id:
        return f"holder_id must have 1..{MAX_HOLDER_ID_LEN} characters, none U+0000"
    return batch_id_problem(g.batch_id)


def batch_id_problem(batch_id: str) -> str | None:
    """What is wrong with a batch id (None: nothing)."""
    if not 0 < len(batch_id) <= MAX_BATCH_ID_LEN or "\x00" in batch_id:
        return f"the batch id must have 1..{MAX_BATCH_ID_LEN} characters, none U+0000"
    if len(batch_id.encode()) > MAX_BATCH_ID_BYTES:
        return f"the batch id must fit in {MAX_BATCH_ID_BYTES} bytes of UTF-8"
    return None


def _user_data(batch_id: str) -> str:
    return _USER_DATA_PREFIX + batch_id


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
    input order. Chunks of ``limits.SUBSIDY_CHUNK`` go through the batcher; ``on_progress``
    hears how many grants each chunk settled. A grant that cannot be posted (``grant_problem``) is a
    ValueError before anything is done."""
    for i, g in enumerate(grants):
        problem = grant_problem(g)
        if problem is not None:
            raise ValueError(f"grant {i} ({g.holder_id!r}): {problem}")
    results: list[GrantResult] = []
    for start in range(0, len(grants), limits.SUBSIDY_CHUNK):
        chunk = grants[start : start + limits.SUBSIDY_CHUNK]
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
                     code=TransferCode.SUBSIDY, user_data=_user_data(g.batch_id))
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


async def clear_down(
    engine: Engine,
    ledger: int,
    month: str,
    *,
    tz: str | None = None,
    on_total: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> list[ClearDownResult]:
    """Return every subsidy purse's unused subsidy of ``month`` to the fund (see the module
    docstring), ``month`` being ``YYYY-MM`` in the campus time zone ``tz`` (default
    ``$ONECARD_TZ``, else Asia/Shanghai). Purses with nothing to return are left out; purses
    already cleared for the month answer ``exists``. ValueError for a malformed month or one
    that has not begun."""
    start, end = month_window(parse_month(month), campus_tz(tz))
    if start > to_ns(datetime.now(UTC)):
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
    for i in range(0, len(todo), limits.SUBSIDY_CHUNK):
        chunk = todo[i : i + limits.SUBSIDY_CHUNK]
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


def open_file(data: bytes) -> tuple[csv.DictReader[str], set[str]]:
    """The file's rows and its header's columns; FileError when the file as a whole is
    unreadable (not UTF-8, a header without ``holder_id`` and ``amount_fen``)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FileError(f"not UTF-8: {e}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = set(reader.fieldnames or ())
    missing = {"holder_id", "amount_fen"} - columns
    if missing:
        raise FileError(f"the header lacks {', '.join(sorted(missing))}")
    return reader, columns


def read_grants(
    data: bytes, *, ledger: int | None, batch_id: str | None
) -> tuple[str, list[Grant]]:
    """Parse a subsidy file (see the module docstring); returns (batch id, grants)."""
    batch = batch_id or "file-" + hashlib.sha256(data).hexdigest()[:16]
    problem = batch_id_problem(batch)
    if problem is not None:
        raise FileError(problem)
    reader, columns = open_file(data)
    if "ledger" not in columns and ledger is None:
        raise FileError("no ledger column: give --ledger")
    grants: list[Grant] = []
    seen: set[tuple[int, str]] = set()
    for n, row in enumerate(reader, start=2):
        holder = (row.get("holder_id") or "").strip()
        raw_amount = (row.get("amount_fen") or "").strip()
        raw_ledger = (row.get("ledger") or "").strip()
        if not 0 < len(holder) <= MAX_HOLDER_ID_LEN or "\x00" in holder:
            raise FileError(f"line {n}: holder_id must have 1..{MAX_HOLDER_ID_LEN} characters,"
                            " none U+0000")
        # ASCII digits only: isdigit() alone takes "\u00b2" (int() then fails) and int()
        # takes other scripts' digits
        if not _is_number(raw_amount) or not 0 < int(raw_amount) <= INT64_MAX:
            raise FileError(f"line {n}: amount_fen must be a positive integer, not {raw_amount!r}")
        if raw_ledger:
            if not _is_number(raw_ledger) or not 0 < int(raw_ledger) <= INT32_MAX:
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


def _is_number(raw: str) -> bool:
    return raw.isascii() and raw.isdigit()
