"""The ledger's routes (contract §4): accounts, transfers, a balance, a page of an account's
transfers; and their wire shapes. Thin handlers over the engine's store and batcher."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar
from uuid import UUID

import msgspec
from litestar import Request, get, post
from litestar.params import FromPath

from engine import limits, metrics
from engine.batcher import Overloaded, TooManyLedgers, Unavailable
from engine.grouping import TransferResult
from engine.http.errors import ApiError, ErrorCode
from engine.http.params import (
    engine_of,
    int_param,
    parse_account_id,
    parse_rfc3339,
    parse_transfer_id,
    rfc3339,
)
from engine.lookups import TransferRecord
from engine.service import Engine
from ledger.account import Account
from ledger.status import AccountStatus
from ledger.transfer import Transfer, user_data_fits
from ledger.types import INT64_MAX, TransferState, transfer_flag_names

_T = TypeVar("_T")


class AccountResult(msgspec.Struct, frozen=True):
    """The answer for one account."""

    id: int
    status: AccountStatus


class TransferView(msgspec.Struct, frozen=True, omit_defaults=True):
    """A stored transfer as shown by the API."""

    id: UUID
    ledger: int
    debit_account_id: int
    credit_account_id: int
    amount: int
    code: int
    flags: list[str]
    timestamp: int
    state: TransferState
    pending_id: UUID | None = None
    timeout_s: int | None = None
    user_data: str | None = None


class Balance(msgspec.Struct, frozen=True):
    """An account's balance, live or as of an instant."""

    account_id: int
    ledger: int
    balance: int
    available: int
    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int
    as_of: str


class TransferPage(msgspec.Struct, frozen=True):
    """A page of an account's transfers, newest first (not a statement: that word is the
    monthly utility statement's and the payment provider's file's)."""

    transfers: list[TransferView]
    next_before: int | None


def view(rec: TransferRecord) -> TransferView:
    """API view of a stored transfer."""
    t = rec.transfer
    return TransferView(
        id=t.id,
        ledger=t.ledger,
        debit_account_id=t.debit_account_id,
        credit_account_id=t.credit_account_id,
        amount=t.amount,
        code=t.code,
        flags=[str(f) for f in transfer_flag_names(t.flags)],
        timestamp=t.timestamp,
        state=rec.state,
        pending_id=t.pending_id,
        timeout_s=t.timeout_s or None,
        user_data=t.user_data,
    )



# The ledger bodies are decoded here, strictly, straight from the bytes: the framework's own
# decoding is lax and would take "1e3" or 1000.0 as an amount of 1000 fen. Money is an integer,
# so a string, a float or a bool where an integer belongs is a 400. (It is also one decoding
# pass instead of the framework's two.) engine/http/ops_routes.py documents these bodies.
_ACCOUNTS_BODY: Final = msgspec.json.Decoder(list[Account])
_TRANSFERS_BODY: Final = msgspec.json.Decoder(list[Transfer])
STRICT_BODIES: Final = {"/v1/accounts": list[Account], "/v1/transfers": list[Transfer]}


async def _strict_body(request: Request[Any, Any, Any], decoder: msgspec.json.Decoder[_T]) -> _T:
    raw = await request.body()
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as e:
        raise ApiError(400, ErrorCode.INVALID_BODY, str(e)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, ErrorCode.INVALID_BODY, f"malformed JSON: {e}") from None


async def _submit(engine: Engine, transfers: list[Transfer]) -> list[TransferResult]:
    try:
        return await engine.batcher.submit(transfers)
    except TooManyLedgers as e:  # each ledger is a transaction of the one committer
        raise ApiError(413, ErrorCode.TOO_LARGE, str(e)) from e
    except Overloaded as e:
        raise ApiError(503, ErrorCode.OVERLOADED, str(e)) from e
    except Unavailable as e:
        raise ApiError(503, ErrorCode.UNAVAILABLE, str(e)) from e


# -- routes ---------------------------------------------------------------------------------------


@post("/v1/accounts", status_code=200)
async def create_accounts(
    request: Request[Any, Any, Any],
) -> list[AccountResult]:
    """Create accounts; one status per account, in request order."""
    data = await _strict_body(request, _ACCOUNTS_BODY)
    if not data:
        raise ApiError(400, ErrorCode.INVALID_BODY, "the list of accounts is empty")
    if len(data) > limits.MAX_ACCOUNTS_PER_REQUEST:
        raise ApiError(413, ErrorCode.TOO_LARGE, f"at most {limits.MAX_ACCOUNTS_PER_REQUEST}")
    for i, a in enumerate(data):
        if "\x00" in (a.name or "") or "\x00" in (a.holder_id or ""):
            raise ApiError(400, ErrorCode.INVALID_BODY, f"[{i}]: U+0000 in name or holder_id")
    statuses = await engine_of(request).store.create_accounts(data)
    for s in statuses:
        metrics.ACCOUNTS.labels(s.value).inc()
    return [AccountResult(a.id, s) for a, s in zip(data, statuses, strict=True)]


@post("/v1/transfers", status_code=200)
async def create_transfers(
    request: Request[Any, Any, Any],
) -> list[TransferResult]:
    """Post a batch of transfers; one status per transfer, in request order. At most 8,190
    transfers naming at most 64 ledgers (each ledger is a transaction of the one committer;
    a ledger counts again after an id the request also names in another ledger): 413."""
    data = await _strict_body(request, _TRANSFERS_BODY)
    if not data:
        raise ApiError(400, ErrorCode.INVALID_BODY, "the list of transfers is empty")
    if len(data) > limits.MAX_TRANSFERS_PER_REQUEST:
        raise ApiError(413, ErrorCode.TOO_LARGE, f"at most {limits.MAX_TRANSFERS_PER_REQUEST}")
    for i, t in enumerate(data):
        if not user_data_fits(t.user_data):
            raise ApiError(400, ErrorCode.INVALID_BODY, f"[{i}].user_data exceeds 256 bytes")
        if t.user_data is not None and "\x00" in t.user_data:
            # PostgreSQL text cannot hold U+0000: it would fail the whole group-committed
            # batch, other clients' transfers included.
            raise ApiError(400, ErrorCode.INVALID_BODY, f"[{i}].user_data contains U+0000")
    return await _submit(engine_of(request), data)


@get("/v1/transfers/{transfer_id:str}")
async def get_transfer(request: Request[Any, Any, Any], transfer_id: FromPath[str]) -> TransferView:
    """One transfer with its timestamp and state."""
    tid = parse_transfer_id(transfer_id)
    rec = await engine_of(request).store.get_transfer(tid)
    if rec is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no transfer {tid}")
    return view(rec)


@get("/v1/accounts/{account_id:str}/balance")
async def get_balance(request: Request[Any, Any, Any], account_id: FromPath[str]) -> Balance:
    """Live balance, or as of ``at`` (RFC 3339) from snapshots plus later transfers."""
    aid = parse_account_id(account_id)
    store = engine_of(request).store
    rec = await store.get_account(aid)
    if rec is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no account {aid}")
    a = rec.state
    at = request.query_params.get("at")
    if at is None:
        as_of = rfc3339(time.time_ns())
    else:
        ns = parse_rfc3339(at)
        b = await store.balance_at(a.ledger, aid, ns)
        a.debits_posted, a.credits_posted = b.debits_posted, b.credits_posted
        a.debits_pending, a.credits_pending = b.debits_pending, b.credits_pending
        as_of = rfc3339(ns)
    return Balance(
        account_id=aid,
        ledger=a.ledger,
        balance=a.balance,
        available=a.available,
        debits_posted=a.debits_posted,
        credits_posted=a.credits_posted,
        debits_pending=a.debits_pending,
        credits_pending=a.credits_pending,
        as_of=as_of,
    )


@get("/v1/accounts/{account_id:str}/transfers")
async def get_transfer_page(
    request: Request[Any, Any, Any], account_id: FromPath[str]
) -> TransferPage:
    """An account's transfers, newest first, ``limit`` at a time, older than ``before``."""
    aid = parse_account_id(account_id)
    limit = int_param(
        request, "limit", limits.DEFAULT_STATEMENT_LIMIT, 1, limits.MAX_STATEMENT_LIMIT
    )
    before = int_param(request, "before", INT64_MAX, 1, INT64_MAX)
    store = engine_of(request).store
    rec = await store.get_account(aid)
    if rec is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no account {aid}")
    records, more = await store.account_transfers(rec.state.ledger, aid, before=before, limit=limit)
    views = [view(r) for r in records]
    return TransferPage(transfers=views, next_before=views[-1].timestamp if more else None)


ROUTES: list[Callable[..., Awaitable[Any]] | Any] = [
    create_accounts,
    create_transfers,
    get_transfer,
    get_balance,
    get_transfer_page,
]
