"""``onecard verify``: prove from the stored rows that the ledger is what the engine wrote.

One pass per ledger over its transfers in timestamp order (a server-side cursor, so memory is
bounded by the number of accounts and of holds open at one instant, never by the history):

* **audit chain**: transfers are grouped by the ``audit_batches`` timestamp ranges and each
  batch's hash is recomputed (``ledger.audit``); a changed row breaks its batch's hash, a
  deleted or inserted row its count, a row outside every range was never committed by the
  engine, and ``ledgers.chain_head`` must be the last head;
* **replay**: every transfer (and every hold expiry, which has no transfer row) is applied to
  running per-account fields; at each snapshot run the recorded fields must equal the replay
  (so a snapshot plus the transfers after it give the live balance), and at the end the live
  ``accounts`` fields must equal it;
* **double entry**: per ledger the live debits equal the credits, posted and pending;
* **holds**: every pending transfer has its ``holds`` row with the same fields, every post or
  void settles a hold that was pending at that instant and is recorded as such, expiries are
  due, and the holds still ``pending`` are exactly the ones the replay leaves open;
* **operator log**: its hash chain is recomputed (``engine.access.oplog.check_chain``): a
  changed, deleted or inserted entry is named.

Everything runs in one REPEATABLE READ read-only transaction per ledger, so it can run beside
a live engine. The report names the first problem: the bad transfer or account and what is
wrong with it.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Final

import asyncpg
import msgspec

from engine.access import oplog
from engine.calendar import campus_tz, from_ns
from engine.db.stream import stream
from ledger import audit
from ledger.types import TransferFlags

if TYPE_CHECKING:
    from engine.db.stream import Conn

MAX_PROBLEMS: Final = 1000  # problems kept per run (the first is the one that matters)
# An over-full audit batch up to this size is searched for the one inserted row (n hashes of n
# rows each); larger ones are reported as a whole.
LOCALISE_MAX_ROWS: Final = 256

_PENDING: Final = int(TransferFlags.PENDING)
_POST: Final = int(TransferFlags.POST_PENDING)
_VOID: Final = int(TransferFlags.VOID_PENDING)
_NS_PER_S: Final = 1_000_000_000
_NEVER: Final = 2**63  # past every engine timestamp
_FIELDS: Final = ("debits_posted", "credits_posted", "debits_pending", "credits_pending")
_ZERO: Final = [0, 0, 0, 0]

SQL_LEDGERS = """
SELECT ledger, chain_head FROM ledgers
WHERE $1::int[] IS NULL OR ledger = ANY($1::int[]) ORDER BY ledger
"""
SQL_BATCHES = """
SELECT first_timestamp, last_timestamp, transfer_count, prev_head, head FROM audit_batches
WHERE ledger = $1 ORDER BY last_timestamp
"""
# The first 11 columns are exactly ``ledger.audit.Row``. `p` is a pending transfer's own hold,
# `r` the hold a post/void resolves.
SQL_TRANSFERS = """
SELECT t.id, t.ledger, t.debit_account_id, t.credit_account_id, t.amount, t.pending_id,
       t.code, t.flags, t.timeout_s, t.user_data, t.timestamp,
       p.debit_account_id AS p_debit, p.credit_account_id AS p_credit, p.amount AS p_amount,
       p.code AS p_code, p.expires_at AS p_expires, p.created_at AS p_created,
       r.state AS r_state, r.resolved_at AS r_resolved
FROM transfers t
LEFT JOIN holds p ON t.flags & 2 <> 0 AND p.id = t.id AND p.ledger = t.ledger
LEFT JOIN holds r ON r.id = t.pending_id AND r.ledger = t.ledger
WHERE t.ledger = $1
ORDER BY t.timestamp
"""
SQL_EXPIRED = """
SELECT id, debit_account_id, credit_account_id, amount, expires_at, resolved_at FROM holds
WHERE ledger = $1 AND state = 'expired' ORDER BY resolved_at
"""
SQL_RUNS = "SELECT timestamp, accounts FROM snapshot_runs WHERE ledger = $1 ORDER BY timestamp"
SQL_SNAPSHOT_ROWS = """
SELECT account_id, debits_posted, credits_posted, debits_pending, credits_pending
FROM balance_snapshots WHERE ledger = $1 AND timestamp = $2 ORDER BY account_id
"""
SQL_ACCOUNTS = """
SELECT id, debits_posted, credits_posted, debits_pending, credits_pending FROM accounts
WHERE ledger = $1 ORDER BY id
"""
SQL_PENDING_HOLDS = "SELECT id FROM holds WHERE ledger = $1 AND state = 'pending' ORDER BY id"
SQL_HOLD_STATES = "SELECT id, state FROM holds WHERE ledger = $1 AND id = ANY($2::uuid[])"
SQL_ORPHAN_HOLDS = """
SELECT h.id, h.state FROM holds h
WHERE h.ledger = $1 AND NOT EXISTS (
    SELECT 1 FROM transfers t WHERE t.id = h.id AND t.ledger = h.ledger AND t.flags & 2 <> 0)
ORDER BY h.created_at LIMIT $2
"""


class Rank(enum.IntEnum):
    """Which check found a problem; lower ranks are reported first within a ledger."""

    CHAIN = 0
    HOLD = 1
    SNAPSHOT = 2
    ACCOUNT = 3
    LEDGER = 4
    OPERATOR_LOG = 5  # the installation's chain, reported under ledger 0


class Problem(msgspec.Struct, frozen=True):
    """One thing that is wrong: ``subject`` names the transfer, account or batch."""

    ledger: int
    rank: Rank
    seq: int
    subject: str
    detail: str

    def __str__(self) -> str:
        if self.rank is Rank.OPERATOR_LOG:
            return f"{self.subject}: {self.detail}"
        return f"ledger {self.ledger}: {self.subject}: {self.detail}"


class Report(msgspec.Struct, kw_only=True):
    """What ``verify`` checked and what it found."""

    ledgers: int = 0
    transfers: int = 0
    batches: int = 0
    snapshots: int = 0
    accounts: int = 0
    expired_holds: int = 0
    operator_log: int = 0  # entries of the operator log checked
    problems: list[Problem] = msgspec.field(default_factory=list)
    more_problems: int = 0  # found beyond MAX_PROBLEMS
    found: int = 0  # problems found so far (numbers them in discovery order)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems

    def first(self) -> Problem | None:
        """The problem to report: the lowest ledger, then the lowest rank, then the earliest."""
        return min(self.problems, key=lambda p: (p.ledger, p.rank, p.seq), default=None)

    def ordered(self) -> list[Problem]:
        """Every kept problem in report order."""
        return sorted(self.problems, key=lambda p: (p.ledger, p.rank, p.seq))


class _Batch(msgspec.Struct, frozen=True):
    first: int
    last: int
    count: int
    prev_head: str
    head: str


class _Reader:
    """Peekable rows of a chunked server-side cursor."""

    def __init__(self, chunks: AsyncIterator[list[asyncpg.Record]]) -> None:
        self._chunks = chunks
        self._rows: list[asyncpg.Record] = []
        self._i = 0

    async def next(self) -> asyncpg.Record | None:
        if self._i >= len(self._rows):
            self._rows = await anext(self._chunks, [])
            self._i = 0
            if not self._rows:
                return None
        r = self._rows[self._i]
        self._i += 1
        return r


def _fmt_ts(ts: int) -> str:
    return f"{ts} ({from_ns(ts, campus_tz()).isoformat(timespec='microseconds')})"


class _LedgerCheck:
    """The one-pass check of one ledger."""

    def __init__(self, conn: Conn, ledger: int, chain_head: str, report: Report) -> None:
        self.conn = conn
        self.ledger = ledger
        self.chain_head = chain_head
        self.report = report
        self.bal: dict[int, list[int]] = {}
        self.open: dict[object, tuple[int, int, int]] = {}  # hold id -> (debit, credit, amount)
        # audit chain
        self.batches: _Reader | None = None
        self.batch: _Batch | None = None
        self.batch_first = _NEVER
        self.batch_last = -1
        self.rows: list[audit.Row] = []
        self.expected_prev = audit.GENESIS
        self.bad_batches: list[tuple[int, _Batch, list[audit.Row]]] = []
        # other timed events: hold expiries and snapshot runs
        self.expiries: _Reader | None = None
        self.next_expiry: asyncpg.Record | None = None
        self.runs: list[asyncpg.Record] = []
        self.run_i = 0
        self.horizon = _NEVER

    # -- bookkeeping ---------------------------------------------------------------------------

    def problem(self, rank: Rank, subject: str, detail: str, *, seq: int | None = None) -> None:
        r = self.report
        if seq is None:
            seq = self.next_seq()
        if len(r.problems) >= MAX_PROBLEMS:
            r.more_problems += 1
            return
        r.problems.append(Problem(self.ledger, rank, seq, subject, detail))

    def next_seq(self) -> int:
        self.report.found += 1
        return self.report.found

    def _acc(self, aid: int) -> list[int]:
        a = self.bal.get(aid)
        if a is None:
            a = self.bal[aid] = [0, 0, 0, 0]
        return a

    # -- the pass ------------------------------------------------------------------------------

    async def run(self) -> None:
        conn, ledger = self.conn, self.ledger
        self.runs = list(await conn.fetch(SQL_RUNS, ledger))
        self.batches = _Reader(stream(conn, SQL_BATCHES, ledger))
        self.expiries = _Reader(stream(conn, SQL_EXPIRED, ledger))
        await self._next_batch()
        self.next_expiry = await self.expiries.next()
        self._set_horizon()
        count = 0
        async for chunk in stream(conn, SQL_TRANSFERS, ledger):
            count += len(chunk)
            for r in chunk:
                if r["timestamp"] > self.horizon:
                    await self._events_before(r["timestamp"])
                self._transfer(r)
        await self._events_before(_NEVER)
        while self.batch is not None:
            self._close_batch()
            await self._next_batch()
        if self.expected_prev != self.chain_head:
            self.problem(
                Rank.CHAIN,
                f"ledger {ledger}",
                f"chain_head {self.chain_head[:16]}... is not the last audit batch's head "
                f"{self.expected_prev[:16]}...",
            )
        self.report.transfers += count
        self.report.snapshots += len(self.runs)
        deltas = await self._check_accounts()
        self._report_bad_batches(deltas)
        await self._check_open_holds()

    def _set_horizon(self) -> None:
        e = self.next_expiry["resolved_at"] if self.next_expiry is not None else _NEVER
        s = self.runs[self.run_i]["timestamp"] if self.run_i < len(self.runs) else _NEVER
        # the pass must stop before a transfer past an audit batch, expiry or snapshot
        self.horizon = min(e, s, self.batch_last)

    async def _events_before(self, ts: int) -> None:
        """Apply the expiries, check the snapshots and close the audit batches before ``ts``."""
        while True:
            while self.batch is not None and self.batch_last < ts:
                self._close_batch()
                await self._next_batch()
            e = self.next_expiry["resolved_at"] if self.next_expiry is not None else _NEVER
            s = self.runs[self.run_i]["timestamp"] if self.run_i < len(self.runs) else _NEVER
            if min(e, s) >= ts:
                break
            if e < s:
                assert self.next_expiry is not None and self.expiries is not None
                self._expire(self.next_expiry)
                self.next_expiry = await self.expiries.next()
            else:
                run = self.runs[self.run_i]
                self.run_i += 1
                await self._check_snapshot(run["timestamp"], run["accounts"])
        self._set_horizon()

    # -- audit chain -----------------------------------------------------------------------------

    async def _next_batch(self) -> None:
        assert self.batches is not None
        r = await self.batches.next()
        if r is None:
            self.batch, self.batch_first, self.batch_last = None, _NEVER, _NEVER
            return
        self.batch = _Batch(*r)
        self.batch_first, self.batch_last = self.batch.first, self.batch.last
        self.report.batches += 1

    def _close_batch(self) -> None:
        b, rows = self.batch, self.rows
        assert b is not None
        self.rows = []
        span = f"audit batch {b.first}..{b.last}"
        if b.prev_head != self.expected_prev:
            self.problem(
                Rank.CHAIN,
                span,
                "its prev_head does not continue the chain: an audit batch before it was "
                "removed, inserted or altered",
            )
        self.expected_prev = b.head
        n = len(rows)
        if n == b.count:
            if audit.extend(b.prev_head, rows) != b.head:
                if n == 1:
                    self.problem(
                        Rank.CHAIN,
                        f"transfer {rows[0][0]}",
                        f"changed after commit: the audit hash of its batch (timestamp "
                        f"{_fmt_ts(b.last)}) no longer matches",
                    )
                else:  # which row: decided once the accounts are checked
                    self.bad_batches.append((self.next_seq(), b, rows))
            return
        if n < b.count:
            gone = b.count - n
            if b.count == 1:
                subject = f"transfer at timestamp {_fmt_ts(b.first)}"
                detail = "deleted: its audit batch committed 1 transfer and no row remains"
            else:
                subject = span
                detail = (
                    f"committed {b.count} transfers but {n} remain: {gone} deleted "
                    f"(remaining: {', '.join(str(x[0]) for x in rows[:5])})"
                )
            self.problem(Rank.CHAIN, subject, detail)
            return
        extra = self._find_inserted(b, rows) if n == b.count + 1 else None
        if extra is not None:
            self.problem(
                Rank.CHAIN,
                f"transfer {extra[0]}",
                f"inserted outside the engine: its audit batch (timestamps {b.first}..{b.last}) "
                f"committed {b.count} transfers, and without this row the hash matches",
            )
        else:
            self.problem(
                Rank.CHAIN,
                span,
                f"committed {b.count} transfers but {n} are in its range: rows were inserted "
                f"({', '.join(str(x[0]) for x in rows[:5])}...)",
            )

    def _find_inserted(self, b: _Batch, rows: list[audit.Row]) -> audit.Row | None:
        if len(rows) > LOCALISE_MAX_ROWS:
            return None
        for i in range(len(rows)):
            if audit.extend(b.prev_head, rows[:i] + rows[i + 1 :]) == b.head:
                return rows[i]
        return None

    def _report_bad_batches(self, deltas: dict[int, list[int]]) -> None:
        """Name the changed row of a multi-row batch where the evidence allows.

        ``deltas`` is replay minus live per mismatched account. An amount changed behind the
        engine's back shows there: a row whose amount minus that delta restores the batch's
        hash is the changed row (and the delta tells its original amount). Otherwise, a row
        alone on the mismatched accounts is named; else the batch with its candidate rows.
        """
        for seq, b, rows in self.bad_batches:
            found = self._find_changed_amount(b, rows, deltas)
            if found is not None:
                r, original = found
                self.problem(
                    Rank.CHAIN,
                    f"transfer {r[0]}",
                    f"changed after commit: amount {original} became {r[4]} (with {original} "
                    f"its audit batch {b.first}..{b.last} hashes right again)",
                    seq=seq,
                )
                continue
            suspects = [r for r in rows if r[2] in deltas or r[3] in deltas]
            if len(suspects) == 1:
                self.problem(
                    Rank.CHAIN,
                    f"transfer {suspects[0][0]}",
                    f"changed after commit: the audit hash of its batch (timestamps "
                    f"{b.first}..{b.last}) no longer matches, and it is the batch's only "
                    f"transfer on an account whose balance disagrees with its transfers",
                    seq=seq,
                )
            else:
                ids = ", ".join(str(r[0]) for r in (suspects or rows)[:10])
                self.problem(
                    Rank.CHAIN,
                    f"audit batch {b.first}..{b.last}",
                    f"changed after commit: the hash of its {len(rows)} transfers no longer "
                    f"matches; one of: {ids}",
                    seq=seq,
                )

    def _find_changed_amount(
        self, b: _Batch, rows: list[audit.Row], deltas: dict[int, list[int]]
    ) -> tuple[audit.Row, int] | None:
        if len(rows) > LOCALISE_MAX_ROWS or not deltas:
            return None
        for i, r in enumerate(rows):
            tries = {deltas.get(r[2], _ZERO)[0], deltas.get(r[3], _ZERO)[1]} - {0}
            for delta in tries:
                original = r[4] - delta
                fixed: audit.Row = (*r[:4], original, *r[5:])
                if audit.extend(b.prev_head, [*rows[:i], fixed, *rows[i + 1 :]]) == b.head:
                    return r, original
        return None

    # -- replay ----------------------------------------------------------------------------------

    def _transfer(self, r: asyncpg.Record) -> None:
        ts: int = r["timestamp"]
        row: audit.Row = r[0:11]
        if ts >= self.batch_first:
            self.rows.append(row)
        else:
            self.problem(
                Rank.CHAIN,
                f"transfer {row[0]}",
                f"its timestamp {_fmt_ts(ts)} lies in no audit batch: written outside the engine",
            )
        flags: int = r["flags"]
        amount: int = r["amount"]
        d, c = self._acc(r["debit_account_id"]), self._acc(r["credit_account_id"])
        if flags & _PENDING:
            d[2] += amount
            c[3] += amount
            self.open[r["id"]] = (r["debit_account_id"], r["credit_account_id"], amount)
            self._check_own_hold(r)
        elif flags & (_POST | _VOID):
            self._resolve(r, d, c, post=bool(flags & _POST))
        else:
            d[0] += amount
            c[1] += amount

    def _check_own_hold(self, r: asyncpg.Record) -> None:
        tid = r["id"]
        if r["p_debit"] is None:
            self.problem(Rank.HOLD, f"transfer {tid}", "pending transfer without a holds row")
            return
        expires = r["timestamp"] + r["timeout_s"] * _NS_PER_S if r["timeout_s"] else 0
        want = {
            "debit_account_id": (r["p_debit"], r["debit_account_id"]),
            "credit_account_id": (r["p_credit"], r["credit_account_id"]),
            "amount": (r["p_amount"], r["amount"]),
            "code": (r["p_code"], r["code"]),
            "created_at": (r["p_created"], r["timestamp"]),
            "expires_at": (r["p_expires"], expires),
        }
        for name, (held, wrote) in want.items():
            if held != wrote:
                self.problem(
                    Rank.HOLD,
                    f"transfer {tid}",
                    f"its hold has {name}={held}, the transfer {wrote}",
                )
                return

    def _resolve(self, r: asyncpg.Record, d: list[int], c: list[int], *, post: bool) -> None:
        tid, pid, amount = r["id"], r["pending_id"], r["amount"]
        what = "post_pending" if post else "void_pending"
        h = self.open.pop(pid, None) if pid is not None else None
        if h is None:
            self.problem(
                Rank.HOLD,
                f"transfer {tid}",
                f"{what} of hold {pid}, which was not pending at that point",
            )
            # still count what it posted, so the balances below are judged on the stored rows
            if post:
                d[0] += amount
                c[1] += amount
            return
        hd, hc, held = h
        self.bal[hd][2] -= held
        self.bal[hc][3] -= held
        if post:
            d[0] += amount
            c[1] += amount
        if (hd, hc) != (r["debit_account_id"], r["credit_account_id"]):
            self.problem(
                Rank.HOLD, f"transfer {tid}", f"{what} names other accounts than hold {pid}"
            )
        elif post and not 0 < amount <= held:
            self.problem(Rank.HOLD, f"transfer {tid}", f"posts {amount} of a hold of {held}")
        elif not post and amount != held:
            self.problem(Rank.HOLD, f"transfer {tid}", f"voids {amount} of a hold of {held}")
        want = "settled" if post else "voided"
        if r["r_state"] != want or r["r_resolved"] != r["timestamp"]:
            self.problem(
                Rank.HOLD,
                f"transfer {tid}",
                f"hold {pid} should be {want} at {r['timestamp']}, holds says "
                f"{r['r_state']} at {r['r_resolved']}",
            )

    def _expire(self, h: asyncpg.Record) -> None:
        self.report.expired_holds += 1
        hid = h["id"]
        held = self.open.pop(hid, None)
        if held is None:
            self.problem(Rank.HOLD, f"hold {hid}", "expired, but it was not pending at that point")
            return
        hd, hc, amount = held
        self.bal[hd][2] -= amount
        self.bal[hc][3] -= amount
        if not 0 < h["expires_at"] <= h["resolved_at"]:
            self.problem(
                Rank.HOLD,
                f"hold {hid}",
                f"expired at {h['resolved_at']} but its timeout is {h['expires_at']}",
            )

    # -- snapshots, accounts, holds ------------------------------------------------------------

    async def _check_snapshot(self, ts: int, recorded: int) -> None:
        seen: set[int] = set()
        async for chunk in stream(self.conn, SQL_SNAPSHOT_ROWS, self.ledger, ts):
            for r in chunk:
                aid: int = r["account_id"]
                seen.add(aid)
                want = self.bal.get(aid, [0, 0, 0, 0])
                for i, name in enumerate(_FIELDS):
                    if r[name] != want[i]:
                        self.problem(
                            Rank.SNAPSHOT,
                            f"account {aid}",
                            f"the snapshot at {_fmt_ts(ts)} records {name}={r[name]}, its "
                            f"transfers before it give {want[i]}",
                        )
                        break
        for aid, v in self.bal.items():
            if aid not in seen and any(v):
                self.problem(
                    Rank.SNAPSHOT,
                    f"account {aid}",
                    f"missing from the snapshot at {_fmt_ts(ts)} (its transfers give {v})",
                )
        if len(seen) != recorded:
            self.problem(
                Rank.SNAPSHOT,
                f"snapshot at {_fmt_ts(ts)}",
                f"snapshot_runs records {recorded} accounts, {len(seen)} rows remain",
            )

    async def _check_accounts(self) -> dict[int, list[int]]:
        """Live fields against the replay, and double entry; returns replay minus live of the
        accounts that disagree."""
        seen: set[int] = set()
        bad: dict[int, list[int]] = {}
        sums = [0, 0, 0, 0]
        async for chunk in stream(self.conn, SQL_ACCOUNTS, self.ledger):
            for r in chunk:
                aid: int = r["id"]
                seen.add(aid)
                want = self.bal.get(aid, [0, 0, 0, 0])
                for i, name in enumerate(_FIELDS):
                    sums[i] += r[name]
                    if r[name] != want[i] and aid not in bad:
                        bad[aid] = [want[k] - r[f] for k, f in enumerate(_FIELDS)]
                        self.problem(
                            Rank.ACCOUNT,
                            f"account {aid}",
                            f"live {name}={r[name]}, but its transfers give {want[i]}",
                        )
        self.report.accounts += len(seen)
        for aid in self.bal.keys() - seen:
            self.problem(Rank.ACCOUNT, f"account {aid}", "has transfers but no accounts row")
        if sums[0] != sums[1]:
            self.problem(
                Rank.LEDGER,
                f"ledger {self.ledger}",
                f"double entry broken: debits_posted total {sums[0]} != credits_posted "
                f"total {sums[1]}",
            )
        if sums[2] != sums[3]:
            self.problem(
                Rank.LEDGER,
                f"ledger {self.ledger}",
                f"double entry broken: debits_pending total {sums[2]} != credits_pending "
                f"total {sums[3]}",
            )
        return bad

    async def _check_open_holds(self) -> None:
        pending: set[object] = set()
        async for chunk in stream(self.conn, SQL_PENDING_HOLDS, self.ledger):
            for r in chunk:
                pending.add(r["id"])
                if r["id"] not in self.open:
                    self.problem(
                        Rank.HOLD,
                        f"hold {r['id']}",
                        "pending in holds, but its transfers resolved it (or never held it)",
                    )
        stale = [hid for hid in self.open if hid not in pending][:MAX_PROBLEMS]
        if stale:
            for r in await self.conn.fetch(SQL_HOLD_STATES, self.ledger, stale):
                self.problem(
                    Rank.HOLD,
                    f"hold {r['id']}",
                    f"holds says {r['state']}, but no transfer or expiry resolved it",
                )
        for r in await self.conn.fetch(SQL_ORPHAN_HOLDS, self.ledger, MAX_PROBLEMS):
            self.problem(
                Rank.HOLD, f"hold {r['id']}", f"{r['state']} hold without its pending transfer"
            )


async def verify(pool: asyncpg.Pool, *, ledgers: Sequence[int] | None = None) -> Report:
    """Check every ledger (or those in ``ledgers``); see the module docstring."""
    report = Report()
    async with pool.acquire() as conn:
        heads = [(r["ledger"], r["chain_head"]) for r in await conn.fetch(SQL_LEDGERS, ledgers)]
        for ledger, head in heads:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                await _LedgerCheck(conn, ledger, head, report).run()
            report.ledgers += 1
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            report.operator_log, faults = await oplog.check_chain(conn)
    for f in faults:
        report.found += 1
        if len(report.problems) < MAX_PROBLEMS:
            report.problems.append(Problem(oplog.CHAIN, Rank.OPERATOR_LOG, report.found,
                                           f.subject, f.detail))
        else:
            report.more_problems += 1
    return report
