"""People, roles and keys on the command line (contract §6): ``operator add|list|disable``,
``apikey create|revoke|list`` and ``rotate-secret``.

A password is read from standard input (from the terminal without echo, twice), never from a
flag, and is never printed or logged. An API key is printed once, when it is created. Every
write is recorded in the operator log with the actor ``cli:<os user>``.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Final

from rich.table import Table

from engine.access import apikeys, operators, oplog
from engine.access.apikeys import Created
from engine.access.lockout import Conn
from engine.access.passwords import PasswordRejected
from engine.access.roles import KEY_ROLES, OPERATOR_ROLES, Role
from engine.access.sealing import rotate_installation
from engine.access.secretbox import SecretKeyError
from engine.calendar import campus_tz, from_ns
from engine.cli.base import Command, common_options, console
from engine.db.pool import create_pool

CLI_ROLE: Final = "cli"  # the role recorded for the command line (it has the database's power)


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def _when(ns: int | None) -> str:
    return "" if ns is None else from_ns(ns, campus_tz()).strftime("%Y-%m-%d %H:%M")


def read_password() -> str | None:
    """The new password: typed twice at a terminal (no echo), else the first line of stdin."""
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            return None
        return first
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else line


async def _record(dsn: str, action: str, target: str, outcome: str) -> None:
    pool = await create_pool(dsn, max_size=1)
    try:
        async with pool.acquire() as conn:
            await oplog.record(conn, oplog.Entry(_actor(), CLI_ROLE, action, target, outcome))
    finally:
        await pool.close()


# -- operator ------------------------------------------------------------------------------------


def _operator_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = sub.add_parser("add", help="add an operator (password from standard input)",
                         parents=[common_options(suppress=True)])
    add.add_argument("--username", required=True)
    add.add_argument("--role", required=True, choices=sorted(OPERATOR_ROLES))
    sub.add_parser("list", help="list the operators", parents=[common_options(suppress=True)])
    disable = sub.add_parser("disable", help="disable an operator for good",
                             parents=[common_options(suppress=True)])
    disable.add_argument("--username", required=True)


async def _operator(args: argparse.Namespace, dsn: str) -> int:
    err = console(stderr=True)
    if args.action == "list":
        return await _list_operators(dsn)
    if args.action == "add":
        password = read_password()
        if password is None:
            err.print("onecard operator add: the two passwords differ")
            return 2
        pool = await create_pool(dsn, max_size=1)
        try:
            status = await operators.add_operator(pool, username=args.username,
                                                  role=Role(args.role), password=password)
        except (ValueError, PasswordRejected) as e:
            err.print(f"onecard operator add: {e}")
            return 2
        finally:
            await pool.close()
        await _record(dsn, "operator add", f"username={args.username} role={args.role}", status)
        print(f"operator {args.username}: {status}")
        return 0 if status is operators.AddStatus.CREATED else 1
    pool = await create_pool(dsn, max_size=1)
    try:
        async with pool.acquire() as conn:
            done = await operators.disable_operator(conn, args.username)
    finally:
        await pool.close()
    await _record(dsn, "operator disable", f"username={args.username}", done)
    print(f"operator {args.username}: {done}")
    return 0 if done is operators.DisableStatus.DISABLED else 1


async def _list_operators(dsn: str) -> int:
    pool = await create_pool(dsn, max_size=1)
    try:
        async with pool.acquire() as conn:
            found = await operators.list_operators(conn)
    finally:
        await pool.close()
    table = Table(title="operators")
    for col in ("username", "role", "created", "disabled"):
        table.add_column(col)
    for o in found:
        table.add_row(o.username, str(o.role), _when(o.created_at), _when(o.disabled_at))
    console().print(table)
    return 0


# -- apikey --------------------------------------------------------------------------------------


def _apikey_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = sub.add_parser("create", help="create a key (printed once)",
                            parents=[common_options(suppress=True)])
    create.add_argument("--role", required=True, choices=sorted(KEY_ROLES))
    create.add_argument("--clearing", type=int, metavar="ACCOUNT_ID",
                        help="a topup key's own clearing account")
    create.add_argument("--clearing-ledger", type=int, metavar="LEDGER",
                        help="the clearing account's ledger, if its id is in several")
    create.add_argument("--name", help="the key's name (default: role-<random>)")
    sub.add_parser("list", help="list the keys (never the keys themselves)",
                   parents=[common_options(suppress=True)])
    revoke = sub.add_parser("revoke", help="revoke a key for good",
                            parents=[common_options(suppress=True)])
    revoke.add_argument("--name", required=True)


async def _apikey(args: argparse.Namespace, dsn: str) -> int:
    pool = await create_pool(dsn, max_size=1)
    try:
        async with pool.acquire() as conn:
            if args.action == "list":
                _print_keys(await apikeys.list_keys(conn))
                return 0
            if args.action == "revoke":
                done = await apikeys.revoke_key(conn, args.name)
                await oplog.record(conn, oplog.Entry(_actor(), CLI_ROLE, "apikey revoke",
                                                     f"name={args.name}", done))
                print(f"key {args.name}: {done}")
                return 0 if done is apikeys.RevokeStatus.REVOKED else 1
            return await _create_key(conn, args)
    finally:
        await pool.close()


async def _create_key(conn: Conn, args: argparse.Namespace) -> int:
    try:
        made = await apikeys.create_key(conn, role=Role(args.role), name=args.name,
                                        clearing=args.clearing,
                                        clearing_ledger=args.clearing_ledger)
    except ValueError as e:
        console(stderr=True).print(f"onecard apikey create: {e}")
        return 2
    name = made.key.name if isinstance(made, Created) else (args.name or "-")
    target = f"name={name} role={args.role}"
    if args.clearing is not None:
        target += f" clearing={args.clearing}"
    outcome = "created" if isinstance(made, Created) else str(made)
    await oplog.record(conn, oplog.Entry(_actor(), CLI_ROLE, "apikey create", target, outcome))
    if not isinstance(made, Created):
        console(stderr=True).print(f"onecard apikey create: {made}")
        return 1
    print(f"name: {made.key.name}")
    print(f"role: {made.key.role}")
    if made.key.clearing_account_id is not None:
        print(f"clearing: {made.key.clearing_account_id} (ledger {made.key.clearing_ledger})")
    print(f"key: {made.secret}")
    print("(shown this once: only its hash is stored)", file=sys.stderr)
    return 0


def _print_keys(keys: list[apikeys.ApiKey]) -> None:
    table = Table(title="API keys")
    for col in ("name", "role", "clearing", "created", "revoked"):
        table.add_column(col)
    for k in keys:
        clearing = "" if k.clearing_account_id is None else (
            f"{k.clearing_account_id} (ledger {k.clearing_ledger})")
        table.add_row(k.name, str(k.role), clearing, _when(k.created_at), _when(k.revoked_at))
    console().print(table)


# -- rotate-secret -------------------------------------------------------------------------------


def _rotate_args(p: argparse.ArgumentParser) -> None:
    pass


async def _rotate(args: argparse.Namespace, dsn: str) -> int:
    pool = await create_pool(dsn, max_size=1)
    try:
        async with pool.acquire() as conn:
            try:
                done = await rotate_installation(conn, args.data_dir)
            except SecretKeyError as e:
                console(stderr=True).print(f"onecard rotate-secret: {e}")
                return 1
            outcome = f"pins={done.sealed.pins} mac_keys={done.sealed.mac_keys}"
            await oplog.record(conn, oplog.Entry(
                _actor(), CLI_ROLE, "rotate-secret",
                f"key {done.old_key_id} -> {done.new_key_id}", outcome))
    finally:
        await pool.close()
    print(f"re-sealed {done.sealed.pins} PINs and {done.sealed.mac_keys} MAC keys under key "
          f"{done.new_key_id} (was {done.old_key_id})")
    return 0


OPERATOR: Final = Command("operator", "add, list or disable operators", _operator_args, _operator)
APIKEY: Final = Command("apikey", "create, list or revoke API keys", _apikey_args, _apikey)
ROTATE_SECRET: Final = Command(
    "rotate-secret", "re-seal every PIN and MAC key under a new secret key", _rotate_args,
    _rotate,
)
