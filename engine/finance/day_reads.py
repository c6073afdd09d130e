"""What an export reads of one business day: the ledgers, each account's posted fields at
the day's start and end (from the nearest snapshot run, independently of the day's transfers)
and the day's postings (``UNPOSTED_FLAGS`` clear). Also used by the monthly statements."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from ledger.types import UNPOSTED_FLAGS, AccountKind

if TYPE_CHECKING:
    from engine.db.stream import Conn

SQL_LEDGERS = """
SELECT ledger FROM ledgers WHERE $1::int[] IS NULL OR ledger = ANY($1::int[]) ORDER BY ledger
"""
# Posted fields of the accounts of ledger $1 (all, or those in $3) just before instant $2,
# from the snapshot run nearest to it: the latest before it plus the postings in between, or
# the first after it minus the postings in between (with the end-of-day scheduler that window
# is tiny). Without a run the "snapshot" is all zeros at timestamp 0. The window is [lo, hi):
# no transfer shares a snapshot's timestamp, and a transfer at $2 itself is after the instant.
# The bounds are scalar subqueries so that they are index conditions, not join filters.
SQL_POSTED_BEFORE = f"""
WITH r AS (
    SELECT ts, sign FROM (
        (SELECT timestamp AS ts, 1 AS sign FROM snapshot_runs
         WHERE ledger = $1 AND timestamp < $2 ORDER BY timestamp DESC LIMIT 1)
        UNION ALL
        (SELECT timestamp, -1 FROM snapshot_runs
         WHERE ledger = $1 AND timestamp > $2 ORDER BY timestamp LIMIT 1)
        UNION ALL
        SELECT 0::bigint, 1
    ) c ORDER BY abs(ts - $2), sign DESC LIMIT 1
), w AS (
    SELECT least(r.ts, $2) AS lo, greatest(r.ts, $2) AS hi, r.ts, r.sign FROM r
), d AS (
    SELECT t.debit_account_id AS id, sum(t.amount)::bigint AS s FROM transfers t
    WHERE t.ledger = $1 AND t.timestamp >= (SELECT lo FROM w) AND t.timestamp < (SELECT hi FROM w)
      AND t.flags & {UNPOSTED_FLAGS} = 0
      AND ($3::bigint[] IS NULL OR t.debit_account_id = ANY($3::bigint[]))
    GROUP BY 1
), c AS (
    SELECT t.credit_account_id AS id, sum(t.amount)::bigint AS s FROM transfers t
    WHERE t.ledger = $1 AND t.timestamp >= (SELECT lo FROM w) AND t.timestamp < (SELECT hi FROM w)
      AND t.flags & {UNPOSTED_FLAGS} = 0
      AND ($3::bigint[] IS NULL OR t.credit_account_id = ANY($3::bigint[]))
    GROUP BY 1
)
SELECT a.id, a.kind, a.name, a.created_at,
       coalesce(b.debits_posted, 0) + w.sign * coalesce(d.s, 0) AS dp,
       coalesce(b.credits_posted, 0) + w.sign * coalesce(c.s, 0) AS cp
FROM accounts a CROSS JOIN w
LEFT JOIN balance_snapshots b
       ON b.ledger = a.ledger AND b.account_id = a.id AND b.timestamp = w.ts
LEFT JOIN d ON d.id = a.id
LEFT JOIN c ON c.id = a.id
WHERE a.ledger = $1 AND ($3::bigint[] IS NULL OR a.id = ANY($3::bigint[]))
ORDER BY a.id
"""
SQL_DAY_COUNT = f"""
SELECT count(*) FROM transfers
WHERE ledger = $1 AND timestamp >= $2 AND timestamp < $3 AND flags & {UNPOSTED_FLAGS} = 0
"""
SQL_DAY_POSTINGS = f"""
SELECT id::text, timestamp, code, debit_account_id, credit_account_id, amount, user_data,
       pending_id::text, flags
FROM transfers
WHERE ledger = $1 AND timestamp >= $2 AND timestamp < $3 AND flags & {UNPOSTED_FLAGS} = 0
ORDER BY timestamp
"""



class AccountDay(msgspec.Struct, kw_only=True):
    """One account over the day, raw posted fields (not signed)."""

    ledger: int
    id: int
    kind: AccountKind
    name: str | None
    created_at: int
    open_dp: int
    open_cp: int
    close_dp: int
    close_cp: int
    debits: int = 0
    credits: int = 0
    count: int = 0  # postings crediting it
    reversed: int = 0  # refunds and reversals debiting it

    def signed(self, dp: int, cp: int) -> int:
        """A balance signed by the kind's normal side."""
        return cp - dp if self.kind.credit_normal else dp - cp


async def accounts_day(conn: Conn, ledger: int, start: int, end: int) -> list[AccountDay]:
    opening = await conn.fetch(SQL_POSTED_BEFORE, ledger, start, None)
    closing = {r["id"]: r for r in await conn.fetch(SQL_POSTED_BEFORE, ledger, end, None)}
    out = []
    for o in opening:
        c = closing[o["id"]]
        out.append(
            AccountDay(
                ledger=ledger,
                id=o["id"],
                kind=AccountKind(o["kind"]),
                name=o["name"],
                created_at=o["created_at"],
                open_dp=o["dp"],
                open_cp=o["cp"],
                close_dp=c["dp"],
                close_cp=c["cp"],
            )
        )
    return out


def existed(a: AccountDay, end: int) -> bool:
    # accounts opened after the day are not part of it (unless they hold money by then)
    return a.created_at < end or bool(a.close_dp or a.close_cp)
