"""Bounded growth: rows that only matter for a while are deleted once past their window.

A table of rules, one per kind of row: its table, its time column (``timestamptz``, compared
with the database's own clock, which stamped it; or engine nanoseconds, ``bigint``, for rows
the application stamps; several columns: the latest of them), the column leading the index on
(scope, time) if there is one, and the environment variable that sets its window in days:
the gateway's remembered answers, the web pages' sessions, login failures and wrong-PIN
counts.

``onecard serve`` runs ``run_pruner`` in the background (``engine.service.supervise``): every
``RETENTION_INTERVAL_S`` it walks each rule's scopes (a loose index scan, cheap at any size)
and deletes each scope's oldest rows past the window, ``RETENTION_BATCH_ROWS`` per statement
with a pause in between, so it never holds many row locks nor a long transaction beside the
hot path. ``onecard_pruned_rows_total{table}`` counts what it deleted.

On a Citus cluster (``cluster=True``) rows are deleted by their primary key, not their row
address (Citus refuses a delete by ``ctid`` through a subquery, and a replicated table's
copies each have their own), and a table with a ``ledger`` column one ledger at a time (those
with a clock, and 0, the installation's): each statement is routed to one worker. The loose
index scan, a recursive statement Citus cannot run, is left out.

Nothing ``onecard verify`` or the exports read is ever pruned (transfers, holds, accounts,
audit batches, snapshots). A retransmission whose remembered answer was pruned is answered
as a request the gateway has not seen: the ledger's derived transfer ids still post nothing
twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Final

import asyncpg
import msgspec

from engine import limits, metrics

log = logging.getLogger(__name__)

ANSWER_RETENTION_ENV: Final = "ONECARD_ANSWER_RETENTION_DAYS"
SESSION_RETENTION_ENV: Final = "ONECARD_SESSION_RETENTION_DAYS"
ATTEMPT_RETENTION_ENV: Final = "ONECARD_ATTEMPT_RETENTION_DAYS"
# A moment in engine nanoseconds, as the application stamps bigint time columns.
_NS_CUTOFF: Final = "(extract(epoch FROM now() - {window}::interval) * 1000000000)::bigint"
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")

# {table}, {time}, {scope}: identifiers from RULES only, never from input; ``rule`` fills
# them in once, at import time.
SQL_SCOPES: Final = """
WITH RECURSIVE s(v) AS (
    (SELECT {scope} FROM {table} ORDER BY {scope} LIMIT 1)
    UNION ALL
    SELECT (SELECT {scope} FROM {table} WHERE {scope} > s.v ORDER BY {scope} LIMIT 1)
    FROM s WHERE s.v IS NOT NULL
)
SELECT v FROM s WHERE v IS NOT NULL
"""
# The oldest rows of one scope, found through the (scope, time) index and deleted by their
# physical address; the time is checked again on the row that is deleted.
SQL_PRUNE_SCOPED: Final = """
DELETE FROM {table}
WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM {table}
        WHERE {scope} = $1 AND {time} < now() - $2::interval
        ORDER BY {time} LIMIT $3))
  AND {time} < now() - $2::interval
"""
# On a cluster: the oldest rows by their primary key ({key}: its columns but the ledger), of
# one ledger ($1) where the table has one ({ledger}: "ledger = $1 AND"), else of the table.
# Ordered in full, key last: each copy of a replicated table runs the statement itself and
# must choose the same rows.
SQL_PRUNE_BY_KEY: Final = """
DELETE FROM {table}
WHERE {ledger} ({key}) IN (
        SELECT {key} FROM {table}
        WHERE {ledger} {time} < now() - $W::interval
        ORDER BY {time}, {key} LIMIT $B)
  AND {time} < now() - $W::interval
"""
# On a cluster, the ledgers a table's rows may belong to: those with a clock, and 0.
SQL_LEDGERS: Final = "SELECT ledger FROM ledgers"
SQL_PRUNE: Final = """
DELETE FROM {table}
WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM {table}
        WHERE {time} < now() - $1::interval
        ORDER BY {time} LIMIT $2))
  AND {time} < now() - $1::interval
"""


class Rule(msgspec.Struct, frozen=True, kw_only=True):
    """One kind of row with a retention window, and its statements (made by ``rule``)."""

    table: str
    env: str  # the variable setting the window in whole days
    default_days: int
    sql_scopes: str | None  # the scope values (None: the table has no scope column)
    sql_prune: str  # ($scope,) $window, $batch -> "DELETE n"
    # on a Citus cluster, by key: per ledger ($ledger, $window, $batch) if ``by_ledger``
    by_ledger: bool
    sql_prune_cluster: str

    def days(self, environ: Mapping[str, str]) -> int:
        """The window in days: ``env`` if set, else the default; ValueError if not >= 1."""
        raw = environ.get(self.env, "").strip()
        if not raw:
            return self.default_days
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"{self.env} must be a whole number of days >= 1, got {raw!r}")
        return int(raw)


def rule(
    *,
    table: str,
    time_column: str | tuple[str, ...],
    scope_column: str | None,
    env: str,
    default_days: int,
    nanoseconds: bool = False,
    key: tuple[str, ...] = ("ctid",),
    by_ledger: bool = False,
) -> Rule:
    """A rule and its statements, assembled once, at import time, from plain identifiers.
    ``time_column``: one column, or several whose latest counts; ``nanoseconds``: they are
    engine nanoseconds (``bigint``), not ``timestamptz``; ``key``: the primary key's columns
    (but ``ledger``) and ``by_ledger``: the table has a ``ledger`` column, for a cluster."""
    columns = (time_column,) if isinstance(time_column, str) else time_column
    for name in (table, *columns, scope_column or "x", *key):
        if _IDENTIFIER.fullmatch(name) is None:
            raise ValueError(f"not a plain SQL identifier: {name!r}")
    time = columns[0] if len(columns) == 1 else f"greatest({', '.join(columns)})"
    scoped = scope_column is not None
    names = {"table": table, "time": time, "scope": scope_column, "key": ", ".join(key),
             "ledger": "ledger = $1 AND" if by_ledger else ""}
    window, size = ("$2", "$3") if by_ledger else ("$1", "$2")
    cluster = SQL_PRUNE_BY_KEY.replace("$W", window).replace("$B", size)
    return Rule(
        table=table,
        env=env,
        default_days=default_days,
        sql_scopes=SQL_SCOPES.format(**names) if scoped else None,
        sql_prune=_cutoff(SQL_PRUNE_SCOPED if scoped else SQL_PRUNE, scoped,
                          nanoseconds).format(**names),
        by_ledger=by_ledger,
        sql_prune_cluster=_cutoff(cluster, by_ledger, nanoseconds).format(**names),
    )


def _cutoff(sql: str, scoped: bool, nanoseconds: bool) -> str:
    """``sql`` comparing with the cutoff as the application stamps the time column."""
    if not nanoseconds:
        return sql
    window = "$2" if scoped else "$1"
    return sql.replace(f"{{time}} < now() - {window}::interval",
                       "{time} < " + _NS_CUTOFF.format(window=window))


RULES: Final[tuple[Rule, ...]] = (
    # the gateway's remembered answers (terminals/gateway.py, migrations/0003_gateway.sql)
    rule(
        table="gateway_responses",
        time_column="created_at",
        scope_column="ledger",
        env=ANSWER_RETENTION_ENV,
        default_days=limits.ANSWER_RETENTION_DAYS,
        key=("key",),
        by_ledger=True,
    ),
    # the web pages' sessions (migrations/0015): idle ones are over after 30 minutes already
    rule(
        table="web_sessions",
        time_column="last_seen",
        scope_column=None,
        env=SESSION_RETENTION_ENV,
        default_days=limits.SESSION_RETENTION_DAYS,
        key=("id_hash",),
    ),
    # failed logins (migrations/0013): a lockout lasts 15 minutes
    rule(
        table="login_failures",
        time_column=("window_start", "locked_until"),
        scope_column=None,
        env=ATTEMPT_RETENTION_ENV,
        default_days=limits.ATTEMPT_RETENTION_DAYS,
        nanoseconds=True,
        key=("realm", "subject"),
        by_ledger=True,
    ),
    # wrong PINs per card and campus day (migrations/0006): they count for one day
    rule(
        table="pin_tries",
        time_column="updated_at",
        scope_column=None,
        env=ATTEMPT_RETENTION_ENV,
        default_days=limits.ATTEMPT_RETENTION_DAYS,
        nanoseconds=True,
        key=("card_no", "day"),
        by_ledger=True,
    ),
)


class Window(msgspec.Struct, frozen=True):
    """A rule with its window."""

    rule: Rule
    keep: timedelta


def windows_from_env(
    rules: Sequence[Rule] = RULES, environ: Mapping[str, str] | None = None
) -> list[Window]:
    """Every rule's window from the environment; ValueError names a bad variable."""
    env = os.environ if environ is None else environ
    return [Window(r, timedelta(days=r.days(env))) for r in rules]


class Pruned(msgspec.Struct, frozen=True):
    """What one pass over a rule deleted, and in how many statements."""

    rows: int
    statements: int


def _deleted(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])  # "DELETE n"


async def prune(
    pool: asyncpg.Pool,
    window: Window,
    *,
    batch: int = limits.RETENTION_BATCH_ROWS,
    pause_s: float = limits.RETENTION_BATCH_PAUSE_S,
    cluster: bool = False,
) -> Pruned:
    """Delete the rule's rows older than the window, ``batch`` per statement (on a Citus
    cluster with ``cluster``: see the module docstring)."""
    r = window.rule
    counter = metrics.PRUNED_ROWS.labels(r.table)
    scopes: list[tuple[object, ...]] = [()]
    sql = r.sql_prune_cluster if cluster else r.sql_prune
    if cluster and r.by_ledger:
        async with pool.acquire() as conn:
            scopes = [(0,), *((row["ledger"],) for row in await conn.fetch(SQL_LEDGERS))]
    elif r.sql_scopes is not None and not cluster:
        async with pool.acquire() as conn:
            scopes = [(row["v"],) for row in await conn.fetch(r.sql_scopes)]
    rows = statements = 0
    for scope in scopes:
        while True:
            # One connection per statement: the engine's pool is not held between batches.
            async with pool.acquire() as conn:
                n = _deleted(await conn.execute(sql, *scope, window.keep, batch))
            rows, statements = rows + n, statements + 1
            counter.inc(n)
            if n < batch:
                break
            await asyncio.sleep(pause_s)
    return Pruned(rows, statements)


async def run_pruner(
    pool: asyncpg.Pool,
    windows: Sequence[Window],
    *,
    interval_s: float = limits.RETENTION_INTERVAL_S,
    cluster: bool = False,
) -> None:
    """Prune every window now and then every ``interval_s``, until cancelled."""
    while True:
        for w in windows:
            done = await prune(pool, w, cluster=cluster)
            if done.rows:
                log.info("pruned %d rows of %s older than %s", done.rows, w.rule.table, w.keep)
        metrics.PRUNE_LAST_PASS.set(time.time())
        await asyncio.sleep(interval_s)
