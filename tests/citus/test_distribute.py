"""``onecard migrate`` on a Citus coordinator: every table distributed by ledger and
co-located, the shared lookups replicated, the append-only guards firing on the shards, the
delegated functions in place; again and again without change; and an existing single-server
database (the previous release's) distributed with its rows."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Final

import asyncpg
import pytest

from engine.db.distribute import REFERENCE_TABLES, DistributionError, distribute
from engine.db.migrate import migrate, migration_files
from engine.finance.verify import verify
from engine.service import Engine
from engine.writing import DELEGATED
from tests.citus.conftest import with_schema
from tests.db.test_upgrade import FIXTURE, buy_a_meal

pytestmark = pytest.mark.citus

# How Citus holds each table of the schema: 'h' hash-distributed, 'n' reference.
SQL_LAYOUT = """
SELECT c.relname AS name, p.partmethod::text, p.colocationid,
       CASE WHEN p.partmethod = 'h' THEN column_to_column_name(p.logicalrelid, p.partkey) END
           AS column
FROM pg_class c LEFT JOIN pg_dist_partition p ON p.logicalrelid = c.oid
WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'
  AND relation_is_a_known_shard(c.oid) IS NOT TRUE
"""
SQL_SHARD_NODES = """
SELECT DISTINCT n.nodeport FROM pg_dist_shard s JOIN pg_dist_placement p USING (shardid)
JOIN pg_dist_node n USING (groupid) WHERE s.logicalrelid = 'ledgers'::regclass
"""
SQL_FUNCTIONS = """
SELECT p.proname, o.distribution_argument_index, o.colocationid, o.force_delegation
FROM pg_dist_object o JOIN pg_proc p ON o.classid = 'pg_proc'::regclass AND o.objid = p.oid
WHERE p.pronamespace = current_schema()::regnamespace
"""
NO_LEDGER: Final = frozenset({"web_sessions", "web_keys"})


@pytest.fixture
async def scratch_schema(citus_dsn: str) -> AsyncIterator[str]:
    """An empty schema of its own on the cluster (dropped afterwards); its DSN."""
    schema = f"onecard_s_{uuid.uuid4().hex[:10]}"
    c = await asyncpg.connect(citus_dsn)
    try:
        await c.execute(f'CREATE SCHEMA "{schema}"')
        yield schema
    finally:
        await c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await c.close()


async def test_every_table_is_distributed_by_ledger_and_co_located(
    conn: asyncpg.Connection,
) -> None:
    layout = {r["name"]: r for r in await conn.fetch(SQL_LAYOUT)}
    assert layout["schema_migrations"]["partmethod"] is None  # the migrator's, coordinator only
    reference = {n for n, r in layout.items() if r["partmethod"] == "n"}
    assert reference == set(REFERENCE_TABLES) | NO_LEDGER
    distributed = {n for n, r in layout.items() if r["partmethod"] == "h"}
    assert distributed == set(layout) - reference - {"schema_migrations"}
    assert {"ledgers", "accounts", "transfers", "holds", "cards", "terminals",
            "gateway_responses", "operator_log"} <= distributed
    assert {layout[n]["column"] for n in distributed} == {"ledger"}
    assert {layout[n]["colocationid"] for n in distributed} == {
        layout["ledgers"]["colocationid"]}
    # the shards are on the workers (the coordinator holds none here)
    ports = {r["nodeport"] for r in await conn.fetch(SQL_SHARD_NODES)}
    assert len(ports) >= 2


async def test_the_batch_writes_are_functions_delegated_by_their_ledger(
    conn: asyncpg.Connection,
) -> None:
    colocation = await conn.fetchval(
        "SELECT colocationid FROM pg_dist_partition WHERE logicalrelid = 'ledgers'::regclass")
    functions = {r["proname"]: r for r in await conn.fetch(SQL_FUNCTIONS)}
    for d in DELEGATED:
        f = functions[d.function]
        assert (f["distribution_argument_index"], f["colocationid"], f["force_delegation"]) == (
            0, colocation, True)


async def test_migrating_again_changes_nothing(conn: asyncpg.Connection) -> None:
    before = sorted(tuple(r) for r in await conn.fetch(SQL_LAYOUT))
    functions = sorted(tuple(r) for r in await conn.fetch(SQL_FUNCTIONS))
    assert await migrate(conn) == []
    assert await distribute(conn) == []
    assert sorted(tuple(r) for r in await conn.fetch(SQL_LAYOUT)) == before
    assert sorted(tuple(r) for r in await conn.fetch(SQL_FUNCTIONS)) == functions


async def test_transfers_and_the_operator_log_stay_append_only_on_the_shards(
    conn: asyncpg.Connection,
) -> None:
    tid = uuid.uuid4()
    await conn.execute(
        "INSERT INTO transfers (ledger, id, debit_account_id, credit_account_id, amount, "
        "code, flags, timestamp) VALUES (7, $1, 1, 2, 100, 1, 0, 1)", tid)
    await conn.execute(
        "INSERT INTO operator_log (ledger, id, at, actor, role, action, target, outcome, "
        "prev_hash, hash) VALUES (7, 1, 0, 'a', 'admin', 'x', 'y', '200', '0', '1')")
    for sql in ("UPDATE transfers SET amount = 1 WHERE ledger = 7 AND id = $1",
                "DELETE FROM transfers WHERE ledger = 7 AND id = $1",
                "UPDATE transfers SET amount = 1 WHERE id = $1",  # every shard
                "DELETE FROM transfers WHERE id = $1"):
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute(sql, tid)
    for sql in ("UPDATE operator_log SET actor = 'b' WHERE ledger = 7",
                "DELETE FROM operator_log WHERE ledger = 7",
                "TRUNCATE operator_log", "TRUNCATE transfers"):
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute(sql)
    assert await conn.fetchval("SELECT amount FROM transfers WHERE ledger = 7 AND id = $1",
                               tid) == 100
    # one timestamp per ledger, on the cluster too (the unique index includes the ledger)
    with pytest.raises(asyncpg.UniqueViolationError):
        await conn.execute(
            "INSERT INTO transfers (ledger, id, debit_account_id, credit_account_id, amount, "
            "code, flags, timestamp) VALUES (7, $1, 1, 2, 5, 1, 0, 1)", uuid.uuid4())


async def test_a_trigger_that_is_not_a_guard_is_refused(
    citus_dsn: str, scratch_schema: str
) -> None:
    c = await asyncpg.connect(with_schema(citus_dsn, scratch_schema))
    try:
        await c.execute("""
            CREATE TABLE ledgers (ledger integer PRIMARY KEY);
            CREATE TABLE audit (ledger integer, n integer, PRIMARY KEY (ledger, n));
            CREATE FUNCTION copy_it() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO audit VALUES (NEW.ledger, 1); RETURN NEW; END $$;
            CREATE TRIGGER copy_it AFTER INSERT ON ledgers
                FOR EACH ROW EXECUTE FUNCTION copy_it();
        """)
        with pytest.raises(DistributionError, match="copy_it"):
            await distribute(c)
    finally:
        await c.close()


async def test_an_existing_database_is_distributed_with_its_rows(
    citus_dsn: str, scratch_schema: str
) -> None:
    # the previous release's database, as a single PostgreSQL held it, in a schema of its own
    dump = FIXTURE.read_text(encoding="utf-8").replace("public.", f'"{scratch_schema}".')
    url = with_schema(citus_dsn, scratch_schema)
    c = await asyncpg.connect(url)
    try:
        await c.execute(dump)
        await c.execute(f'SET search_path = "{scratch_schema}"')  # the dump empties it
        counts = {t: await c.fetchval(f"SELECT count(*) FROM {t}")
                  for t in ("transfers", "holds", "cards", "terminals", "gateway_responses")}
        old = {r["name"] for r in await c.fetch("SELECT name FROM schema_migrations")}
        applied = await migrate(c)
        assert applied == [name for name, _ in migration_files() if name not in old]
        for table, n in counts.items():
            assert await c.fetchval(f"SELECT count(*) FROM {table}") == n, table
        assert await c.fetchval(
            "SELECT count(*) FROM pg_dist_partition WHERE logicalrelid = 'transfers'::regclass"
        ) == 1
        assert await c.fetchval("SELECT count(*) FROM card_numbers") == counts["cards"]
        assert await c.fetchval("SELECT count(*) FROM terminal_ids") == counts["terminals"]
    finally:
        await c.close()
    engine = Engine(url)
    await engine.start(run_migrations=False)
    try:
        report = await verify(engine.store.pool)
        assert report.ok, report.first()
        await buy_a_meal(engine)
        after = await verify(engine.store.pool)
    finally:
        await engine.stop()
    assert after.ok, after.first()
    assert after.transfers == report.transfers + 1


async def test_a_new_migration_runs_on_the_distributed_schema(
    citus_dsn: str, scratch_schema: str
) -> None:
    # a cluster distributed before 0026 existed: 0026 then runs on distributed cards and
    # terminals, and its tables join the cluster before anything else runs
    c = await asyncpg.connect(with_schema(citus_dsn, scratch_schema))
    try:
        await migrate(c)
        await c.execute("""
            INSERT INTO accounts (ledger, id, kind, code, flags, created_at)
                VALUES (5, 1, 'purse', 1, 0, 0), (5, 2, 'subsidy', 1, 0, 0);
            INSERT INTO holders (ledger, id, name, kind, purse_account_id, subsidy_account_id,
                                 created_at) VALUES (5, 'h', 'n', 'student', 1, 2, 0);
            INSERT INTO cards (ledger, card_no, holder_id, status, created_at, updated_at)
                VALUES (5, '88000001', 'h', 'active', 0, 0);
        """)
        name = next(n for n, _ in migration_files() if n.startswith("0026_"))
        await c.execute("DROP TABLE card_numbers, terminal_ids")
        await c.execute("DELETE FROM schema_migrations WHERE name = $1", name)
        assert await migrate(c) == [name]
        layout = {r["name"]: r["partmethod"] for r in await c.fetch(SQL_LAYOUT)}
        assert layout["card_numbers"] == layout["terminal_ids"] == "n"
        assert await c.fetchval("SELECT ledger FROM card_numbers WHERE card_no = '88000001'") == 5
    finally:
        await c.close()
