"""The stored state against the replay of ``onecard verify``: the snapshot runs, the live
accounts (and double entry), and the holds still pending."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final, TypeAlias

from engine.db.stream import stream
from engine.finance.verify_report import MAX_PROBLEMS, Rank, Report, fmt_ts

if TYPE_CHECKING:
    from engine.db.stream import Conn

_FIELDS: Final = ("debits_posted", "credits_posted", "debits_pending", "credits_pending")

Balances: TypeAlias = dict[int, list[int]]  # account -> the four fields, as replayed
OpenHolds: TypeAlias = dict[object, tuple[int, int, int]]  # hold id -> (debit, credit, amount)
Problems: TypeAlias = Callable[[Rank, str, str], None]  # (rank, subject, detail)

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



async def check_snapshot(
    conn: Conn, ledger: int, bal: Balances, ts: int, recorded: int, problem: Problems
) -> None:
    """The snapshot run at ``ts`` against the replay so far."""
    seen: set[int] = set()
    async for chunk in stream(conn, SQL_SNAPSHOT_ROWS, ledger, ts):
        for r in chunk:
            aid: int = r["account_id"]
            seen.add(aid)
            want = bal.get(aid, [0, 0, 0, 0])
            for i, name in enumerate(_FIELDS):
                if r[name] != want[i]:
                    problem(
                        Rank.SNAPSHOT,
                        f"account {aid}",
                        f"the snapshot at {fmt_ts(ts)} records {name}={r[name]}, its "
                        f"transfers before it give {want[i]}",
                    )
                    break
    for aid, v in bal.items():
        if aid not in seen and any(v):
            problem(
                Rank.SNAPSHOT,
                f"account {aid}",
                f"missing from the snapshot at {fmt_ts(ts)} (its transfers give {v})",
            )
    if len(seen) != recorded:
        problem(
            Rank.SNAPSHOT,
            f"snapshot at {fmt_ts(ts)}",
            f"snapshot_runs records {recorded} accounts, {len(seen)} rows remain",
        )


async def check_accounts(
    conn: Conn, ledger: int, bal: Balances, report: Report, problem: Problems
) -> dict[int, list[int]]:
    """Live fields against the replay, and double entry; returns replay minus live of the
    accounts that disagree."""
    seen: set[int] = set()
    bad: dict[int, list[int]] = {}
    sums = [0, 0, 0, 0]
    async for chunk in stream(conn, SQL_ACCOUNTS, ledger):
        for r in chunk:
            aid: int = r["id"]
            seen.add(aid)
            want = bal.get(aid, [0, 0, 0, 0])
            for i, name in enumerate(_FIELDS):
                sums[i] += r[name]
                if r[name] != want[i] and aid not in bad:
                    bad[aid] = [want[k] - r[f] for k, f in enumerate(_FIELDS)]
                    problem(
                        Rank.ACCOUNT,
                        f"account {aid}",
                        f"live {name}={r[name]}, but its transfers give {want[i]}",
                    )
    report.accounts += len(seen)
    for aid in bal.keys() - seen:
        problem(Rank.ACCOUNT, f"account {aid}", "has transfers but no accounts row")
    if sums[0] != sums[1]:
        problem(
            Rank.LEDGER,
            f"ledger {ledger}",
            f"double entry broken: debits_posted total {sums[0]} != credits_posted "
            f"total {sums[1]}",
        )
    if sums[2] != sums[3]:
        problem(
            Rank.LEDGER,
            f"ledger {ledger}",
            f"double entry broken: debits_pending total {sums[2]} != credits_pending "
            f"total {sums[3]}",
        )
    return bad


async def check_open_holds(
    conn: Conn, ledger: int, open_holds: OpenHolds, problem: Problems
) -> None:
    """The holds table against the holds the replay leaves open."""
    pending: set[object] = set()
    async for chunk in stream(conn, SQL_PENDING_HOLDS, ledger):
        for r in chunk:
            pending.add(r["id"])
            if r["id"] not in open_holds:
                problem(
                    Rank.HOLD,
                    f"hold {r['id']}",
                    "pending in holds, but its transfers resolved it (or never held it)",
                )
    stale = [hid for hid in open_holds if hid not in pending][:MAX_PROBLEMS]
    if stale:
        for r in await conn.fetch(SQL_HOLD_STATES, ledger, stale):
            problem(
                Rank.HOLD,
                f"hold {r['id']}",
                f"holds says {r['state']}, but no transfer or expiry resolved it",
            )
    for r in await conn.fetch(SQL_ORPHAN_HOLDS, ledger, MAX_PROBLEMS):
        problem(
            Rank.HOLD, f"hold {r['id']}", f"{r['state']} hold without its pending transfer"
        )
