"""Gateway mechanics over real TCP on a real engine: framing, limits, format checks, sign-on,
pipelining, graceful stop, the answer memory on PostgreSQL, and the pure helpers.

These tests never reach a money flow; the campus is replaced by a terminal registry double
(only ``Campus.terminal`` is ever called here). Every money flow is tested against the real
campus in test_gateway_flows.py.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import msgspec
import pytest

from engine.service import Engine
from terminals.answers import AnswerMemory
from terminals.client import TerminalClient
from terminals.framing import frame, read_frame
from terminals.gateway import Gateway
from terminals.iso8583 import (
    FormatError,
    Message,
    decode_message,
    encode_message,
    encode_message_unmac,
    encode_original,
)
from terminals.operations import (
    Operation,
    auth_id_for,
    classify,
    message_key,
    request_digest,
    rrn_for,
)

KEY = bytes(range(32))
TID = "MECH0001"
MID = "MECHANICS000001"


class _Term(msgspec.Struct, frozen=True):
    """The attributes of engine.campus.Terminal the gateway reads."""

    terminal_id: str
    merchant_id: str
    ledger: int
    kind: str
    account_id: int
    mac_key: bytes


class Registry:
    """Stands in for Campus.terminal() only. ``gate`` (when set) holds every lookup until it
    is opened, so tests can keep requests in flight; ``active``/``peak`` count them."""

    def __init__(self) -> None:
        self.terms = {TID: _Term(TID, MID, 1, "pos", 1, KEY)}
        self.gate: asyncio.Event | None = None
        self.active = 0
        self.peak = 0
        self.entered = asyncio.Event()
        self.misused: list[str] = []

    def __getattr__(self, name: str) -> Any:
        # Any money operation reaching the double is a test failure, not a silent 96.
        self.misused.append(name)
        raise AttributeError(name)

    async def terminal(self, terminal_id: str) -> _Term | None:
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.entered.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            return self.terms.get(terminal_id)
        finally:
            self.active -= 1


GatewayFactory = Callable[..., Awaitable[tuple[Gateway, Registry]]]


@pytest.fixture
async def make_gateway(engine: Engine) -> AsyncIterator[GatewayFactory]:
    started: list[tuple[Gateway, Registry]] = []

    async def make(**kwargs: Any) -> tuple[Gateway, Registry]:
        registry = Registry()
        gw = Gateway(engine, campus=registry, **kwargs)  # type: ignore[arg-type]
        await gw.start("127.0.0.1", 0)
        started.append((gw, registry))
        return gw, registry

    yield make
    for gw, registry in started:
        await gw.stop(grace_s=2)
        assert registry.misused == []  # mechanics never reach a money operation


def client(gw: Gateway, *, tid: str = TID, mid: str = MID, key: bytes = KEY) -> TerminalClient:
    return TerminalClient(
        "127.0.0.1", gw.port, terminal_id=tid, merchant_id=mid, mac_key=key, timeout_s=5
    )


async def raw_exchange(port: int, data: bytes, *, wait_s: float = 5) -> bytes | None:
    """Send ``data`` verbatim on a new connection; the first answer payload, None on EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(wait_s):
            return await read_frame(reader)
    finally:
        writer.close()


async def assert_closed(reader: asyncio.StreamReader) -> None:
    async with asyncio.timeout(5):
        assert await reader.read() == b""


# ---------------------------------------------------------------------------------------
# pure helpers


def _msg(**kw: Any) -> Message:
    base: dict[str, Any] = {
        "mti": "0200",
        "processing_code": "000000",
        "card_no": "6222000011112222",
        "amount": 1200,
        "transmission_dt": "0315203005",
        "stan": "000001",
        "terminal_id": TID,
        "merchant_id": MID,
    }
    base.update(kw)
    return Message(**base)


def test_message_key_is_derived_from_terminal_stan_and_field7() -> None:
    k = message_key(TID, "000001", "0315203005")
    assert k.version == 8 and k.int >> 80 == 315203005  # sorts by field 7 (ledger/ids.py)
    assert message_key(TID, "000001", "0315203006") > k
    assert message_key("MECH0002", "999999", "0316000000") > k
    assert k == message_key(TID, "000001", "0315203005")
    assert k != message_key(TID, "000002", "0315203005")
    assert k != message_key("MECH0002", "000001", "0315203005")
    assert k != message_key(TID, "000001", "0315203006")


def test_digest_covers_business_fields_not_local_time() -> None:
    m = _msg(local_time="120000", local_date="0316")
    assert request_digest(m) == request_digest(msgspec.structs.replace(m, local_time="120001"))
    for change in ({"amount": 1201}, {"card_no": "6222000011113333"}, {"mti": "0220"},
                   {"merchant_id": "OTHER0000000001"}, {"room_id": "A-101"},
                   {"pin_data": b"12345678"}):
        assert request_digest(m) != request_digest(msgspec.structs.replace(m, **change))


def test_rrn_and_auth_id_shapes() -> None:
    key = uuid.uuid4()
    rrn = rrn_for(key)
    assert len(rrn) == 12 and rrn.isalnum() and rrn == rrn.upper()
    assert rrn == rrn_for(key) and rrn != rrn_for(key, 1)
    assert len({rrn_for(uuid.uuid4()) for _ in range(2000)}) == 2000
    auth = auth_id_for(key)
    assert len(auth) == 6 and auth.isalnum() and auth == auth_id_for(key)


@pytest.mark.parametrize(
    ("fields", "op"),
    [
        ({"mti": "0800", "processing_code": None, "card_no": None, "amount": None},
         Operation.SIGN_ON),
        ({}, Operation.PURCHASE),
        ({"processing_code": "310000", "amount": None}, Operation.INQUIRY),
        ({"processing_code": "400000", "room_id": "A-101"}, Operation.ELECTRICITY),
        ({"mti": "0220"}, Operation.ADVICE),
        ({"mti": "0220", "card_no": None,
          "original_data": encode_original("0100", "000009", "0315203000")},
         Operation.COMPLETION),
        ({"mti": "0220", "processing_code": "410000", "card_no": None, "room_id": "A-101"},
         Operation.METER),
        ({"mti": "0100"}, Operation.HOLD),
        ({"mti": "0400", "original_data": encode_original("0200", "000009", "0315203000")},
         Operation.REVERSAL),
        ({"processing_code": "200000"}, Operation.UNSUPPORTED),
        ({"mti": "0100", "processing_code": "310000"}, Operation.UNSUPPORTED),
        ({"mti": "0600"}, Operation.UNSUPPORTED),
    ],
)
def test_classify(fields: dict[str, Any], op: Operation) -> None:
    assert classify(_msg(**fields)) is op


@pytest.mark.parametrize(
    "fields",
    [
        {"terminal_id": None},
        {"stan": None},
        {"transmission_dt": None},
        {"processing_code": None},
        {"amount": None},
        {"card_no": None},
        {"processing_code": "400000"},  # electricity without field 102
        {"mti": "0220", "processing_code": "410000", "room_id": "A-101"},  # meter with field 2
        {"mti": "0220", "processing_code": "410000", "card_no": None},  # meter without 102
        {"mti": "0400"},  # reversal without field 90
    ],
)
def test_classify_format_errors(fields: dict[str, Any]) -> None:
    with pytest.raises(FormatError):
        classify(_msg(**fields))


# ---------------------------------------------------------------------------------------
# sign-on, MAC, terminal and merchant checks (no money involved)


async def test_sign_on_echo(make_gateway: GatewayFactory) -> None:
    gw, _ = await make_gateway()
    async with client(gw) as c:
        for _ in range(3):
            req = c.sign_on()
            ans = await c.request(req)  # the client verifies the answer's MAC
            assert ans.mti == "0810" and ans.response_code == "00"
            assert (ans.stan, ans.transmission_dt, ans.terminal_id) == (
                req.stan, req.transmission_dt, TID
            )
            assert ans.local_time is not None and ans.local_date is not None


async def test_unknown_terminal_gets_63_without_mac(make_gateway: GatewayFactory) -> None:
    gw, _ = await make_gateway()
    async with client(gw, tid="NOBODY01") as c:
        req = c.sign_on()
        raw = await c.send_raw(encode_message(req, KEY))
    assert raw is not None
    decoded = decode_message(raw)
    assert decoded.message.response_code == "63" and decoded.mac is None


async def test_bad_or_missing_mac_gets_maced_63(make_gateway: GatewayFactory) -> None:
    gw, _ = await make_gateway()
    async with client(gw, key=bytes(32)) as c:  # wrong key
        raw = await c.send_raw(encode_message(c.sign_on(), bytes(32)))
        assert raw is not None
        decoded = decode_message(raw)
        assert decoded.message.response_code == "63" and decoded.verify(KEY)
        unmaced = await c.send_raw(encode_message_unmac(c.sign_on()))
        assert unmaced is not None
        decoded = decode_message(unmaced)
        assert decoded.message.response_code == "63" and decoded.verify(KEY)


async def test_wrong_merchant_gets_03(make_gateway: GatewayFactory) -> None:
    gw, _ = await make_gateway()
    async with client(gw, mid="SOMEONEELSE0001") as c:
        ans = await c.request(c.sign_on())
    assert ans.response_code == "03"


async def test_checks_run_in_contract_order(make_gateway: GatewayFactory) -> None:
    """A frame that is malformed AND badly MACed AND from another merchant answers 30."""
    gw, _ = await make_gateway()
    async with client(gw, mid="SOMEONEELSE0001", key=bytes(32)) as c:
        bad = msgspec.structs.replace(c.purchase("6222000011112222", 100), amount=None)
        raw = await c.send_raw(encode_message(bad, bytes(32)))
        assert raw is not None and decode_message(raw).message.response_code == "30"
        # format fine, MAC bad, merchant bad: 63 comes first
        raw = await c.send_raw(encode_message(c.sign_on(), bytes(32)))
        assert raw is not None and decode_message(raw).message.response_code == "63"


async def test_format_errors_answer_30(make_gateway: GatewayFactory) -> None:
    gw, _ = await make_gateway()
    async with client(gw) as c:
        # no field 41: cannot be attributed, so no MAC
        no_tid = msgspec.structs.replace(c.sign_on(), terminal_id=None)
        raw = await c.send_raw(encode_message(no_tid, KEY))
        assert raw is not None
        d = decode_message(raw)
        assert (d.message.mti, d.message.response_code, d.mac) == ("0810", "30", None)
        # a known terminal's malformed request: 30 with the terminal's MAC
        no_amount = msgspec.structs.replace(c.purchase("6222000011112222", 100), amount=None)
        raw = await c.send_raw(encode_message(no_amount, KEY))
        assert raw is not None
        d = decode_message(raw)
        assert d.message.response_code == "30" and d.verify(KEY)
        assert d.message.stan == no_amount.stan
        # MAC not the last field: field 64 with a secondary bitmap present
        body = bytearray(encode_message(c.meter_advice("A-101", 5), KEY))
        body[11] |= 0x01  # set bit 64 (last of the primary bitmap) as well as 128
        raw = await c.send_raw(bytes(body))
        assert raw is not None and decode_message(raw).message.response_code == "30"
        # the connection is still usable
        assert (await c.request(c.sign_on())).response_code == "00"


async def test_garbage_gets_30_or_clean_close_and_others_keep_working(
    make_gateway: GatewayFactory,
) -> None:
    gw, _ = await make_gateway()
    rng = random.Random(8583)
    async with client(gw) as other:
        assert (await other.request(other.sign_on())).response_code == "00"
        cases = [
            frame(b"0200" + bytes(rng.randrange(256) for _ in range(40))),  # request MTI, junk
            frame(bytes(rng.randrange(256) for _ in range(100))),  # pure noise
            frame(b"0210" + bytes(8)),  # an answer MTI sent to the gateway
            b"\xff\xff" + b"x" * 10,  # oversize length prefix
            b"\x00\x00",  # zero-length frame
            frame(encode_message(other.sign_on(), KEY))[:-5],  # truncated, then EOF
        ]
        for data in cases:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(data)
            await writer.drain()
            if data is cases[-1]:
                writer.write_eof()
            async with asyncio.timeout(5):
                payload = await read_frame(reader)
            if payload is not None:
                d = decode_message(payload)
                assert d.message.response_code == "30" and d.message.mti == "0210"
            writer.close()
            assert (await other.request(other.sign_on())).response_code == "00"
        for _ in range(50):  # fuzz: any bytes at all, never a crash
            blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
            try:
                payload = await raw_exchange(gw.port, frame(blob))
            except (ConnectionError, asyncio.IncompleteReadError):
                payload = None
            if payload is not None:
                assert decode_message(payload).message.response_code == "30"
        assert (await other.request(other.sign_on())).response_code == "00"


async def test_oversize_frame_closes_cleanly(make_gateway: GatewayFactory) -> None:
    gw, _ = await make_gateway(max_frame_bytes=64)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"\x00\x41")  # 65 > 64: refused before reading the body
    await writer.drain()
    await assert_closed(reader)
    writer.close()


# ---------------------------------------------------------------------------------------
# connection limits


async def test_pipelining_answers_in_order(make_gateway: GatewayFactory) -> None:
    gw, _ = await make_gateway()
    c = client(gw)
    reqs = [c.sign_on() for _ in range(10)]
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"".join(frame(encode_message(r, KEY)) for r in reqs))
    await writer.drain()
    stans = []
    async with asyncio.timeout(5):
        for _ in reqs:
            payload = await read_frame(reader)
            assert payload is not None
            d = decode_message(payload)
            assert d.verify(KEY) and d.message.response_code == "00"
            stans.append(d.message.stan)
    assert stans == [r.stan for r in reqs]
    writer.close()


async def test_inflight_per_connection_is_bounded(make_gateway: GatewayFactory) -> None:
    gw, reg = await make_gateway(max_inflight_per_connection=3)
    reg.gate = asyncio.Event()
    c = client(gw)
    reqs = [c.sign_on() for _ in range(10)]
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"".join(frame(encode_message(r, KEY)) for r in reqs))
    await writer.drain()
    await asyncio.sleep(0.3)
    assert reg.active == 3  # the reader paused at the bound
    reg.gate.set()
    async with asyncio.timeout(5):
        got = [await read_frame(reader) for _ in reqs]
    assert all(p is not None and decode_message(p).message.response_code == "00" for p in got)
    assert reg.peak == 3
    writer.close()


async def test_idle_timeout_closes(make_gateway: GatewayFactory) -> None:
    gw, _ = await make_gateway(idle_timeout_s=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    t0 = time.monotonic()
    await assert_closed(reader)
    assert 0.25 < time.monotonic() - t0 < 3
    writer.close()
    # a half-sent frame is idle too (a slow-loris peer)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"\x00\x30abc")
    await assert_closed(reader)
    writer.close()


async def test_connection_cap(make_gateway: GatewayFactory) -> None:
    gw, _ = await make_gateway(max_connections=2)
    a, b = client(gw), client(gw)
    await a.connect()
    await b.connect()
    assert (await a.request(a.sign_on())).response_code == "00"
    assert (await b.request(b.sign_on())).response_code == "00"
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    await assert_closed(reader)  # the third is closed at once
    writer.close()
    assert gw.connections == 2
    await a.close()
    for _ in range(100):
        if gw.connections < 2:
            break
        await asyncio.sleep(0.01)
    async with client(gw) as c:  # room again
        assert (await c.request(c.sign_on())).response_code == "00"
    assert (await b.request(b.sign_on())).response_code == "00"
    await b.close()


async def test_graceful_stop_answers_inflight_then_closes(engine: Engine) -> None:
    reg = Registry()
    reg.gate = asyncio.Event()
    gw = Gateway(engine, campus=reg)  # type: ignore[arg-type]
    await gw.start("127.0.0.1", 0)
    port = gw.port
    c = client(gw)
    req = c.sign_on()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(frame(encode_message(req, KEY)))
    await writer.drain()
    async with asyncio.timeout(5):
        await reg.entered.wait()
    stopping = asyncio.create_task(gw.stop(grace_s=5))
    await asyncio.sleep(0.1)
    with pytest.raises(OSError):  # no longer accepting
        await asyncio.open_connection("127.0.0.1", port)
    assert not stopping.done()
    reg.gate.set()
    async with asyncio.timeout(5):
        payload = await read_frame(reader)
        assert payload is not None
        assert decode_message(payload).message.response_code == "00"
        assert await reader.read() == b""  # then closed
        await stopping
    writer.close()


async def test_stop_grace_runs_out(engine: Engine) -> None:
    reg = Registry()
    reg.gate = asyncio.Event()  # never opened
    gw = Gateway(engine, campus=reg)  # type: ignore[arg-type]
    await gw.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(frame(encode_message(client(gw).sign_on(), KEY)))
    await writer.drain()
    t0 = time.monotonic()
    await gw.stop(grace_s=0.3)
    assert time.monotonic() - t0 < 3
    data = b"unset"
    async with asyncio.timeout(5):
        try:
            data = await reader.read()
        except ConnectionError:  # aborted: a reset instead of a FIN
            data = b""
    assert data == b""  # dropped without an answer
    writer.close()


async def test_overload_answers_96_at_once(make_gateway: GatewayFactory) -> None:
    """A full batcher queue answers 96 before any work is queued (the campus is never
    asked: the registry double records any money call)."""
    gw, reg = await make_gateway()
    batcher = gw.engine.batcher
    saved = batcher.max_queued
    batcher.max_queued = 0
    try:
        async with client(gw) as c:
            t0 = time.perf_counter()
            ans = await c.request(c.purchase("6222000011112222", 100))
            elapsed = time.perf_counter() - t0
    finally:
        batcher.max_queued = saved
    assert ans.response_code == "96" and ans.rrn is None
    assert elapsed < 0.05
    assert reg.misused == []  # answered before the campus was asked


async def test_many_connections(make_gateway: GatewayFactory) -> None:
    gw, _ = await make_gateway()

    async def one() -> str | None:
        async with client(gw) as c:
            return (await c.request(c.sign_on())).response_code

    codes = await asyncio.gather(*(one() for _ in range(300)))
    assert codes == ["00"] * 300


# ---------------------------------------------------------------------------------------
# the answer memory on PostgreSQL


@pytest.fixture
async def pool(engine: Engine) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(engine.dsn, min_size=1, max_size=2)
    assert p is not None
    yield p
    await p.close()


async def test_memory_remembers_first_answer(pool: asyncpg.Pool, ids: Any) -> None:
    mem = AnswerMemory(pool)
    ledger = ids.ledger()
    key = uuid.uuid4()
    assert await mem.lookup(ledger, key) is None
    first = _msg(mti="0210", response_code="00")
    a = await mem.remember(ledger, key, TID, b"d1", first)
    assert a.remembered and a.response.rrn == rrn_for(key)
    # a second writer under the same key gets the first answer back
    b = await mem.remember(ledger, key, TID, b"d2", _msg(mti="0210", response_code="51"))
    assert b == a
    assert await mem.lookup(ledger, key) == a
    assert await mem.lookup(ledger + 1, key) is None  # keys live inside their ledger


async def test_memory_batches_concurrent_requests(pool: asyncpg.Pool, ids: Any) -> None:
    mem = AnswerMemory(pool, max_batch=16)
    ledger = ids.ledger()
    keys = [uuid.uuid4() for _ in range(100)]
    answers = await asyncio.gather(
        *(mem.remember(ledger, k, TID, k.bytes, _msg(mti="0210", response_code="00"))
          for k in keys)
    )
    found = await asyncio.gather(*(mem.lookup(ledger, k) for k in keys))
    assert found == answers
    assert [a.digest for a in answers] == [k.bytes for k in keys]


async def test_memory_rrn_collision_takes_next_candidate(pool: asyncpg.Pool, ids: Any) -> None:
    mem = AnswerMemory(pool)
    ledger = ids.ledger()
    key, squatter = uuid.uuid4(), uuid.uuid4()
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO gateway_responses (ledger, key, terminal_id, request_digest, rrn,"
            " response) VALUES ($1, $2, $3, $4, $5, $6)",
            ledger, squatter, TID, b"x", rrn_for(key, 0), b"{}",
        )
    a = await mem.remember(ledger, key, TID, b"d", _msg(mti="0210", response_code="00"))
    assert a.response.rrn == rrn_for(key, 1)


def test_environment_time_zone(engine: Engine) -> None:
    old = os.environ.get("ONECARD_TZ")
    os.environ["ONECARD_TZ"] = "Europe/Paris"
    try:
        assert Gateway(engine, campus=Registry()).tz == "Europe/Paris"  # type: ignore[arg-type]
    finally:
        if old is None:
            del os.environ["ONECARD_TZ"]
        else:
            os.environ["ONECARD_TZ"] = old
