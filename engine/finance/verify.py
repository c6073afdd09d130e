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

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Final

import asyncpg

from engine.access import oplog
from engine.db.stream import stream
from engine.finance.verify_chain import Batch, find_changed_amount, find_inserted
from engine.finance.verify_report import MAX_PROBLEMS, Problem, Rank, Report, fmt_ts
from engine.finance.verify_stored import check_accounts, check_open_holds, check_snapshot
from ledger import audit
from ledger.types import TransferFlags

if TYPE_CHECKING:
    from engine.db.stream import Conn

_PENDING: Final = int(TransferFlags.PENDING)
_POST: Final = int(TransferFlags.POST_PENDING)
_VOID: Final = int(TransferFlags.VOID_PENDING)
_NS_PER_S: Final = 1_000_000_000
_NEVER: Final = 2**63  # past every engine timestamp

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


class _LedgerCheck:
    """The one-pass check of one ledger.

    One class (the module is over 400 lines for it): the audit chain and the replay share the
    pass's per-row state (the current batch's bounds and rows, the running balances, the open
    holds); split into objects, every transfer row would pay an extra attribute hop.
    """

    def __init__(self, conn: Conn, ledger: int, chain_head: str, report: Report) -> None:
        self.conn = conn
        self.ledger = ledger
        self.chain_head = chain_head
        self.report = report
        self.bal: dict[int, list[int]] = {}
        self.open: dict[object, tuple[int, int, int]] = {}  # hold id -> (debit, credit, amount)
        # audit chain
        self.batches: _Reader | None = None
        self.batch: Batch | None = None
        self.batch_first = _NEVER
        self.batch_last = -1
        self.rows: list[audit.Row] = []
        self.expected_prev = audit.GENESIS
        self.bad_batches: list[tuple[int, Batch, list[audit.Row]]] = []
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
        deltas = await check_accounts(
            self.conn, self.ledger, self.bal, self.report, self.problem
        )
        self._report_bad_batches(deltas)
        await check_open_holds(self.conn, self.ledger, self.open, self.problem)

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
                ts, recorded = run["timestamp"], run["accounts"]
                await check_snapshot(self.conn, self.ledger, self.bal, ts, recorded, self.problem)
        self._set_horizon()

    # -- audit chain -----------------------------------------------------------------------------

    async def _next_batch(self) -> None:
        assert self.batches is not None
        r = await self.batches.next()
        if r is None:
            self.batch, self.batch_first, self.batch_last = None, _NEVER, _NEVER
            return
        self.batch = Batch(*r)
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
                        f"{fmt_ts(b.last)}) no longer matches",
                    )
                else:  # which row: decided once the accounts are checked
                    self.bad_batches.append((self.next_seq(), b, rows))
            return
        if n < b.count:
            gone = b.count - n
            if b.count == 1:
                subject = f"transfer at timestamp {fmt_ts(b.first)}"
                detail = "deleted: its audit batch committed 1 transfer and no row remains"
            else:
                subject = span
                detail = (
                    f"committed {b.count} transfers but {n} remain: {gone} deleted "
                    f"(remaining: {', '.join(str(x[0]) for x in rows[:5])})"
                )
            self.problem(Rank.CHAIN, subject, detail)
            return
        extra = find_inserted(b, rows) if n == b.count + 1 else None
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

    def _report_bad_batches(self, deltas: dict[int, list[int]]) -> None:
        """Name the changed row of a multi-row batch where the evidence allows.

        ``deltas`` is replay minus live per mismatched account. An amount changed behind the
        engine's back shows there: a row whose amount minus that delta restores the batch's
        hash is the changed row (and the delta tells its original amount). Otherwise, a row
        alone on the mismatched accounts is named; else the batch with its candidate rows.
        """
        for seq, b, rows in self.bad_batches:
            found = find_changed_amount(b, rows, deltas)
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
                f"its timestamp {fmt_ts(ts)} lies in no audit batch: written outside the engine",
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
