"""Micro benchmarks (pytest-benchmark) of the per-transfer CPU paths: the pure batch rules,
the store's write-column building, the audit hash, and the codecs (HTTP JSON, ISO 8583).

In the default run ``--benchmark-disable`` makes each a plain test (one call, results checked);
``pytest tests/bench/test_micro.py --benchmark-enable`` times them.
"""

from __future__ import annotations

import random
import uuid
from typing import Any, Final
from zoneinfo import ZoneInfo

import msgspec
import pytest

from engine.campus.spending import SpendMemory
from engine.grouping import TransferResult
from engine.rows import pg_array as _pg_array
from engine.writing import _astuple, _columns
from ledger import audit
from ledger.account import AccountState
from ledger.apply import apply_transfers
from ledger.status import TransferStatus
from ledger.transfer import Transfer
from ledger.types import AccountKind, TransferCode
from terminals.client import TerminalClient
from terminals.iso8583 import AmountBlock, Message, ResponseCode, codec, encode_amounts, reference
from terminals.replies import Replier

BATCH: Final = 8190
PURSES: Final = 2000
MERCHANT: Final = PURSES + 1
LEDGER: Final = 7
T0: Final = 1_700_000_000 * 10**9


def _meals(n: int, seed: int = 1) -> list[Transfer]:
    rng = random.Random(seed)
    return [
        Transfer(
            id=uuid.UUID(int=rng.getrandbits(128), version=4),
            ledger=LEDGER,
            debit_account_id=rng.randint(1, PURSES),
            credit_account_id=MERCHANT,
            amount=rng.randint(300, 2500),
            code=TransferCode.MEAL,
        )
        for _ in range(n)
    ]


def _accounts() -> dict[int, AccountState]:
    a = {
        p: AccountState(p, LEDGER, AccountKind.PURSE, 1, 1, credits_posted=10**9)
        for p in range(1, PURSES + 1)
    }
    a[MERCHANT] = AccountState(MERCHANT, LEDGER, AccountKind.MERCHANT, 2, 0)
    return a


def test_apply_hot_merchant_batch(benchmark: Any) -> None:
    """8190 meals on one merchant: every one created, the merchant touched (written) once."""
    batch = _meals(BATCH)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (batch,), {"accounts": _accounts(), "transfers": {}, "holds": {},
                          "first_timestamp": T0}

    outcome = benchmark.pedantic(apply_transfers, setup=setup, rounds=5)
    assert set(outcome.statuses) == {TransferStatus.CREATED}
    assert len(outcome.created) == BATCH
    touched = outcome.touched_accounts
    assert len(touched) == len(set(touched)) and touched.count(MERCHANT) == 1
    assert [t.timestamp for t in outcome.created] == list(range(T0 + 1, T0 + 1 + BATCH))


def test_write_columns(benchmark: Any) -> None:
    """The batch insert's arrays: audit rows transposed, in the audit row's column order."""
    outcome = apply_transfers(
        _meals(BATCH), accounts=_accounts(), transfers={}, holds={}, first_timestamp=T0
    )
    rows = [_astuple(t) for t in outcome.created]
    cols = benchmark(_columns, rows, 11)
    assert len(cols) == 11 and all(len(c) == BATCH for c in cols)
    assert list(cols[0]) == [t.id for t in outcome.created]
    assert list(cols[4]) == [t.amount for t in outcome.created]
    assert list(cols[5]) == [t.pending_id for t in outcome.created]
    assert list(cols[10]) == [t.timestamp for t in outcome.created]
    assert _columns([], 5) == [(), (), (), (), ()]


def test_pg_array_literal(benchmark: Any) -> None:
    """Id columns as PostgreSQL array literals (how the store ships them)."""
    ids = [t.id for t in _meals(BATCH)]
    text = benchmark(_pg_array, ids)
    assert text.startswith('{"') and text.endswith('"}')
    assert text[1:-1].split(",") == [f'"{i}"' for i in ids]
    assert _pg_array([1, None, -3]) == "{1,null,-3}"


def test_audit_chain_hash(benchmark: Any) -> None:
    """Hashing a full batch: deterministic, and any changed field changes the head."""
    outcome = apply_transfers(
        _meals(BATCH), accounts=_accounts(), transfers={}, holds={}, first_timestamp=T0
    )
    rows = [_astuple(t) for t in outcome.created]
    head = benchmark(audit.extend, audit.GENESIS, rows)
    assert head == audit.extend(audit.GENESIS, rows) and len(head) == 64
    changed = [*rows[:-1], (*rows[-1][:4], rows[-1][4] + 1, *rows[-1][5:])]
    assert audit.extend(audit.GENESIS, changed) != head


def test_decode_transfers_json(benchmark: Any) -> None:
    """The API's request body for a full batch, decoded into Transfer structs."""
    batch = _meals(BATCH)
    body = msgspec.json.encode(batch)
    decoder = msgspec.json.Decoder(list[Transfer])
    got = benchmark(decoder.decode, body)
    assert got == batch


def test_encode_results_json(benchmark: Any) -> None:
    """The API's answer for a full batch."""
    results = [
        TransferResult(str(t.id), TransferStatus.CREATED, T0 + i)
        for i, t in enumerate(_meals(BATCH))
    ]
    encoder = msgspec.json.Encoder()
    body = benchmark(encoder.encode, results)
    back = msgspec.json.decode(body)
    assert len(back) == BATCH and back[0] == {
        "id": results[0].id, "status": "created", "timestamp": T0
    }


@pytest.fixture
def pos() -> TerminalClient:
    """A terminal (never connected): builds the messages."""
    return TerminalClient(
        "127.0.0.1", 1, terminal_id="T0000001", merchant_id="M00000000000001", mac_key=b"k" * 32
    )


_CODECS: Final = {"specialised": codec, "pyiso8583": reference}


def _purchase_answer(request: Message) -> Message:
    """The gateway's approval of ``request``: RRN, auth id, campus time and field 54."""
    answer = Replier(ZoneInfo("Asia/Shanghai")).reply(
        request, ResponseCode.APPROVED, auth_id="A1B2C3", amounts=encode_amounts(
            [AmountBlock(account_type=t, amount=8_766) for t in ("00", "10", "20")]))
    return msgspec.structs.replace(answer, rrn="0A1B2C3D4E5F")


@pytest.mark.parametrize("engine", _CODECS)
@pytest.mark.parametrize("kind", ["request", "answer"])
def test_iso8583_purchase_roundtrip(
    benchmark: Any, pos: TerminalClient, engine: str, kind: str
) -> None:
    """A 0200 purchase or its 0210 approval: encode with its MAC, then decode, by the codec
    the gateway and the client use and by its pyiso8583 reference (compare within a kind)."""
    benchmark.group = f"iso8583 purchase {kind}: encode + decode"
    impl = _CODECS[engine]
    key = b"k" * 32
    msg = pos.purchase("6210000000000001", 1234)
    if kind == "answer":
        msg = _purchase_answer(msg)

    def roundtrip() -> Any:
        return impl.decode_message(impl.encode_message(msg, key))

    decoded = benchmark(roundtrip)
    assert decoded.verify(key) and not decoded.verify(b"x" * 32)
    assert decoded.message == msg
    assert impl.encode_message(msg, key) == reference.encode_message(msg, key)


def test_spend_memory_hears_a_batch(benchmark: Any) -> None:
    """The campus's commit observer on a batch of 8190 meals, every purse's holder remembered
    (the daily-limit memory's cost on the committer's path, per batch)."""
    memory = SpendMemory(ttl_s=3600, max_holders=PURSES, day_of=lambda ns: 0)
    memory.watching = True
    for p in range(1, PURSES + 1, 2):  # holders own two purses: (p, p + 1)
        memory.finish(memory.begin(LEDGER, p, p + 1), 0, 0, None, T0)
    outcome = apply_transfers(_meals(BATCH), accounts=_accounts(), transfers={}, holds={},
                              first_timestamp=T0 + 1)
    benchmark(memory.committed, LEDGER, outcome.created)
    once = sum(t.amount for t in outcome.created if t.debit_account_id in (1, 2))
    remembered = memory.lookup(LEDGER, 1, 0)  # holder (1, 2): every round added its meals
    assert once > 0 and remembered is not None and remembered % once == 0
