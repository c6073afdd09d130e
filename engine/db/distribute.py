"""On a Citus coordinator: distribute the schema by ``ledger``, after the migrations.

A plain PostgreSQL has no ``citus`` extension and nothing here runs. Where the target database
has it, ``engine.db.migrate`` calls :func:`distribute` once the files are applied (they create
plain tables, the same as anywhere), under the same advisory lock:

- every table with a ``ledger`` column is hash-distributed by it, all co-located with
  ``ledgers`` (each ledger's clock, accounts, transfers, holds and campus rows sit in one shard
  group on one worker, so a batch is a transaction on one worker);
- the small tables every campus shares become reference tables (a copy on every node): those
  without a ``ledger`` column, and those whose ``ledger`` is the installation's 0 by a
  constraint (operators, API keys) or that are lookups by a value unique across ledgers;
- ``schema_migrations`` stays a coordinator-local table (only the migrator reads it).

Tables are distributed in foreign-key order (a referenced table first). Citus refuses a table
with triggers unless ``citus.enable_unsafe_triggers`` is on: the only triggers the schema has
are the append-only guards, which raise and touch no other table (the "unsafe" case is a
trigger whose own statements Citus cannot route), so the setting is turned on for the
distributing transaction of a table whose triggers are all such guards, and any other trigger
is refused with a :class:`DistributionError`. The guards then fire on every shard.

The batch writes become functions delegated by their ledger argument (engine/db/delegated.py).

Idempotent: a table already distributed (or reference) is left as it is, and ``migrate`` calls
this after every file it applies to a schema already distributed: a table a later migration
adds joins the cluster before the next file runs. (Such a file must not declare a foreign key
to a distributed table itself, as Citus refuses a plain table referencing one: the next file
adds the key.) A fresh schema's files all run first, on plain tables, as anywhere.
"""

from __future__ import annotations

from typing import Final

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from engine.db.delegated import Delegated
from engine.writing import DELEGATED

# The distribution column and the table every distributed table is co-located with.
DISTRIBUTION_COLUMN: Final = "ledger"
ANCHOR: Final = "ledgers"
# Stays local to the coordinator: only the migrator reads it.
LOCAL_TABLES: Final = frozenset({"schema_migrations"})
# Shared by every campus although they have a `ledger` column: fixed to 0 (the installation)
# or keyed by a value unique across ledgers. A copy on every node: read locally anywhere.
REFERENCE_TABLES: Final = frozenset({"operators", "api_keys", "card_numbers", "terminal_ids"})
# Trigger functions that only raise (append-only guards): safe on every shard.
GUARD_FUNCTIONS: Final = frozenset({"transfers_append_only", "operator_log_append_only"})

SQL_HAS_CITUS: Final = "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus')"
SQL_IS_COORDINATOR: Final = "SELECT citus_is_coordinator()"
SQL_STARTED: Final = """
SELECT EXISTS (SELECT FROM pg_dist_partition WHERE logicalrelid = to_regclass($1)::oid)
"""
# The schema's tables, with how Citus holds each now (NULL: a plain table) and whether it has
# the distribution column. The engine's sessions see shards (engine/db/pool.py): the
# coordinator holds a placement of every reference table, which is not a table of its own.
SQL_TABLES: Final = """
SELECT c.oid, c.relname AS name, p.partmethod::text,
       EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = $1
               AND NOT a.attisdropped) AS has_ledger
FROM pg_class c LEFT JOIN pg_dist_partition p ON p.logicalrelid = c.oid
WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'
  AND relation_is_a_known_shard(c.oid) IS NOT TRUE  -- a shard placed on this node
ORDER BY c.relname
"""
SQL_FOREIGN_KEYS: Final = """
SELECT conrelid AS child, confrelid AS parent FROM pg_constraint
WHERE contype = 'f' AND connamespace = current_schema()::regnamespace
"""
SQL_TRIGGER_FUNCTIONS: Final = """
SELECT p.proname FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
WHERE t.tgrelid = $1 AND NOT t.tgisinternal
"""
SQL_ENABLE_GUARDS: Final = "SET LOCAL citus.enable_unsafe_triggers = on"
SQL_DISTRIBUTE: Final = (
    "SELECT create_distributed_table($1::oid::regclass, $2, colocate_with => $3)"
)
SQL_REFERENCE: Final = "SELECT create_reference_table($1::oid::regclass)"
SQL_QUALIFIED: Final = "SELECT $1::oid::regclass::text"
SQL_FUNCTION_EXISTS: Final = "SELECT to_regproc($1)"
SQL_FUNCTION_DISTRIBUTED: Final = """
SELECT EXISTS (SELECT FROM pg_dist_object
               WHERE classid = 'pg_proc'::regclass AND objid = to_regproc($1)::oid)
"""
SQL_TYPE_NAME: Final = "SELECT format_type($1::oid, NULL)"
SQL_DISTRIBUTE_FUNCTION: Final = """
SELECT create_distributed_function($1::regprocedure, '$1', colocate_with => $2,
                                   force_delegation => true)
"""
SQL_SIGNATURE: Final = "SELECT $1::regproc::oid::regprocedure::text"

Connection = asyncpg.Connection | PoolConnectionProxy


class DistributionError(RuntimeError):
    """The schema cannot be distributed as it is (a table Citus would refuse)."""


async def has_citus(conn: Connection) -> bool:
    """Whether the connected database has the ``citus`` extension."""
    return bool(await conn.fetchval(SQL_HAS_CITUS))


async def is_distributed(conn: Connection) -> bool:
    """Whether the engine runs on a Citus cluster: the database has the extension. Then the
    delegated functions of this engine's statements must exist (``onecard migrate`` makes
    them); an engine of another version would otherwise call functions that are not there."""
    if not await has_citus(conn):
        return False
    missing = [d.function for d in DELEGATED
               if await conn.fetchval(SQL_FUNCTION_EXISTS, d.function) is None]
    if missing:
        raise DistributionError(
            f"the cluster lacks this engine's functions ({', '.join(missing)}): "
            "run `onecard migrate` with this version"
        )
    return True


async def check_coordinator(conn: Connection) -> None:
    """DistributionError unless connected to the cluster's coordinator (migrations create
    and distribute tables there; a worker would keep them to itself)."""
    if not await conn.fetchval(SQL_IS_COORDINATOR):
        raise DistributionError("migrate a Citus cluster on its coordinator, not on a worker")


async def is_started(conn: Connection) -> bool:
    """Whether this schema is distributed already (its anchor table is)."""
    return bool(await conn.fetchval(SQL_STARTED, ANCHOR))


async def distribute(conn: Connection) -> list[str]:
    """Distribute or replicate every table not yet held by Citus; returns their names
    (``"name (reference)"`` for reference tables). Only on a Citus coordinator."""
    await check_coordinator(conn)
    tables = {r["oid"]: r for r in await conn.fetch(SQL_TABLES, DISTRIBUTION_COLUMN)}
    by_name = {r["name"]: oid for oid, r in tables.items()}
    if ANCHOR not in by_name:
        raise DistributionError(f"no {ANCHOR} table: apply the migrations first")
    anchor = await conn.fetchval(SQL_QUALIFIED, by_name[ANCHOR])
    parents: dict[int, set[int]] = {oid: set() for oid in tables}
    for r in await conn.fetch(SQL_FOREIGN_KEYS):
        if r["child"] in parents and r["parent"] != r["child"]:
            parents[r["child"]].add(r["parent"])
    done: list[str] = []
    for oid in _parents_first(parents, first=by_name[ANCHOR]):
        t = tables[oid]
        if t["partmethod"] is not None or t["name"] in LOCAL_TABLES:
            continue
        reference = t["name"] in REFERENCE_TABLES or not t["has_ledger"]
        async with conn.transaction():
            await _allow_guards(conn, oid, t["name"])
            if reference:
                await conn.execute(SQL_REFERENCE, oid)
            else:
                # the anchor starts its own co-location group; the rest join it
                with_ = "none" if oid == by_name[ANCHOR] else anchor
                await conn.execute(SQL_DISTRIBUTE, oid, DISTRIBUTION_COLUMN, with_)
        done.append(f"{t['name']} (reference)" if reference else t["name"])
    await delegate(conn, DELEGATED, colocate_with=anchor)
    return done


async def delegate(
    conn: Connection, statements: tuple[Delegated, ...], *, colocate_with: str
) -> None:
    """Create the delegated function of each statement that lacks one, distributed by its
    first argument. The functions of earlier versions stay: an engine of the previous version
    still running during an upgrade goes on calling its own."""
    for d in statements:
        # its name is its text's digest: a distributed function of that name is this one
        # (DDL on every engine's start would take locks the running engines' batches need)
        if await conn.fetchval(SQL_FUNCTION_DISTRIBUTED, d.function):
            continue
        async with conn.transaction():
            signature = await define(conn, d)
            await conn.execute(SQL_DISTRIBUTE_FUNCTION, signature, colocate_with)


async def _allow_guards(conn: Connection, oid: int, name: str) -> None:
    """Let Citus take the table's triggers if every one is an append-only guard."""
    functions = {r["proname"] for r in await conn.fetch(SQL_TRIGGER_FUNCTIONS, oid)}
    if not functions:
        return
    unknown = functions - GUARD_FUNCTIONS
    if unknown:
        raise DistributionError(
            f"table {name} has triggers Citus cannot be trusted to run on its shards "
            f"({', '.join(sorted(unknown))}); only raise-only guards are distributed"
        )
    await conn.execute(SQL_ENABLE_GUARDS)


async def define(conn: Connection, d: Delegated) -> str:
    """Create (or replace) the statement's function, its parameter and result types those
    PostgreSQL infers for the statement itself; its signature."""
    stmt = await conn.prepare(d.sql)
    types = [await conn.fetchval(SQL_TYPE_NAME, p.oid) for p in stmt.get_parameters()]
    attrs = stmt.get_attributes()
    result = await conn.fetchval(SQL_TYPE_NAME, attrs[0].type.oid) if attrs else None
    await conn.execute(d.definition(types, result))
    signature: str = await conn.fetchval(SQL_SIGNATURE, d.function)
    return signature


def _parents_first(parents: dict[int, set[int]], *, first: int) -> list[int]:
    """The tables in an order where every referenced table comes before its referrers, and
    ``first`` (the co-location anchor) before everything."""
    order: list[int] = []
    seen: set[int] = set()

    def visit(oid: int) -> None:
        if oid in seen:
            return
        seen.add(oid)
        for p in sorted(parents.get(oid, ())):
            visit(p)
        order.append(oid)

    visit(first)
    for oid in sorted(parents):
        visit(oid)
    return order
