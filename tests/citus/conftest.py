"""The Citus suite (marker ``citus``): the engine on a coordinator with workers.

Runs only when asked for (``pytest -m citus``) and ``ONECARD_CITUS_DSN`` names a database with
the ``citus`` extension on a coordinator that has workers (README, "Running distributed").
Each session migrates into a fresh schema of that database (``search_path`` in the DSN), so
the tables are distributed by ``onecard migrate``'s own step and dropped afterwards; the
shared fixtures of tests/conftest.py (engine, api, http) then run on it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from engine.db.migrate import migrate

CITUS_DSN_VAR = "ONECARD_CITUS_DSN"


def with_schema(dsn: str, schema: str) -> str:
    """``dsn`` with every connection's ``search_path`` set to ``schema`` (and the tests' own
    connections seeing relations unfiltered, as the engine's do: engine/db/pool.py)."""
    sep = "&" if "?" in dsn else "?"
    return f"{dsn}{sep}search_path={schema}&citus.override_table_visibility=off"


@pytest.fixture(scope="session")
def citus_dsn() -> str:
    """The coordinator's database (the suite is skipped without one)."""
    dsn = os.environ.get(CITUS_DSN_VAR)
    if not dsn:
        pytest.skip(f"set {CITUS_DSN_VAR} to a Citus coordinator's database")
    return dsn


@pytest.fixture(scope="session")
async def dsn(citus_dsn: str) -> AsyncIterator[str]:
    """A fresh schema on the cluster, migrated (and so distributed) by ``migrate``."""
    schema = f"onecard_t_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    conn = await asyncpg.connect(citus_dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()
    url = with_schema(citus_dsn, schema)
    c = await asyncpg.connect(url)
    try:
        await migrate(c)
    finally:
        await c.close()
    yield url
    conn = await asyncpg.connect(citus_dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of its own to the session's schema on the cluster."""
    c = await asyncpg.connect(dsn)
    try:
        yield c
    finally:
        await c.close()


# -- the cluster's layout --------------------------------------------------------------------

SQL_WORKER_OF = """
SELECT n.nodename, n.nodeport FROM pg_dist_placement p JOIN pg_dist_node n USING (groupid)
WHERE p.shardid = get_shard_id_for_distribution_column('ledgers', $1::int)
"""
SQL_WORKERS = """
SELECT nodename, nodeport FROM pg_dist_node
WHERE isactive AND shouldhaveshards AND noderole = 'primary' ORDER BY nodeid
"""

Node = tuple[str, int]


async def worker_of(conn: asyncpg.Connection, ledger: int) -> Node:
    """The worker holding ``ledger``'s shard group."""
    r = await conn.fetchrow(SQL_WORKER_OF, ledger)
    assert r is not None, f"ledger {ledger} has no placement"
    return r["nodename"], r["nodeport"]


async def workers(conn: asyncpg.Connection) -> list[Node]:
    """The workers that hold shards."""
    return [(r["nodename"], r["nodeport"]) for r in await conn.fetch(SQL_WORKERS)]


async def ledgers_apart(conn: asyncpg.Connection, fresh: Callable[[], int], n: int
                        ) -> list[int]:
    """``n`` fresh ledgers whose shards sit on ``n`` different workers."""
    found: dict[Node, int] = {}
    for _ in range(1000):
        ledger = fresh()
        found.setdefault(await worker_of(conn, ledger), ledger)
        if len(found) == n:
            return list(found.values())
    raise AssertionError(f"the cluster has fewer than {n} workers with shards")


# -- the single-server suites, run here ------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_server_only(request: pytest.FixtureRequest) -> None:
    """Skip a test a module lists in ``ONE_SERVER_ONLY`` (name, or name[param]: the reason):
    the suites of tests/engine, tests/campus and tests/terminals run here as they are, but a
    few of their tests check what a cluster does differently by design, or reach past the SQL
    interface (a plan's shape, a trigger switched off in one session)."""
    reasons: dict[str, str] = getattr(request.module, "ONE_SERVER_ONLY", {})
    node = request.node
    reason = reasons.get(node.name) or reasons.get(getattr(node, "originalname", ""))
    if reason:
        pytest.skip(f"one server only: {reason}")
