"""TerminalClient against a tiny in-test gateway double, plus its message builders."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import msgspec
import pytest

from terminals.client import (
    ConnectionClosedError,
    MalformedResponseError,
    RequestTimeoutError,
    ResponseMacError,
    TerminalClient,
    UnexpectedResponseError,
)
from terminals.framing import FrameError, frame, read_frame
from terminals.iso8583 import (
    FormatError,
    Message,
    decode_message,
    encode_message,
    encode_message_unmac,
    parse_original,
    response_mti,
)
from terminals.mac import pin_block

KEY = bytes(range(32))
TID = "POS00001"
MID = "CANTEEN00000001"
CARD = "6222000011112222"
# 2025-03-15 20:30:05 UTC is 2025-03-16 04:30:05 in Shanghai: the local date differs.
FIXED = datetime(2025, 3, 15, 20, 30, 5, tzinfo=UTC)


class FakeGateway:
    """Echo-style gateway: answers with the response MTI, field 39 '00' and a MAC.

    ``mode`` selects a misbehaviour: silent, bad_mac, no_mac, no_mac_63, close, wrong_stan,
    oversize.
    """

    def __init__(self) -> None:
        self.mode = "echo"
        self.received: list[Message] = []
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (payload := await read_frame(reader)) is not None:
                try:
                    decoded = decode_message(payload)
                except FormatError:
                    break  # garbage: hang up, like a gateway that gives up on a peer
                self.received.append(decoded.message)
                reply = self.reply(decoded.message)
                if self.mode == "close":
                    break
                if reply is not None:
                    writer.write(reply)
                    await writer.drain()
        except (FrameError, ConnectionError):
            pass
        finally:
            writer.close()

    def reply(self, msg: Message) -> bytes | None:
        answer = msgspec.structs.replace(
            msg, mti=response_mti(msg.mti), response_code="00", pin_data=None
        )
        if self.mode == "silent":
            return None
        if self.mode == "oversize":
            return b"\xff\xff"
        if self.mode == "wrong_stan":
            answer = msgspec.structs.replace(answer, stan="999999")
        if self.mode == "no_mac":
            return frame(encode_message_unmac(answer))
        if self.mode == "no_mac_63":
            return frame(encode_message_unmac(msgspec.structs.replace(answer, response_code="63")))
        raw = encode_message(answer, KEY)
        if self.mode == "bad_mac":
            raw = raw[:-1] + bytes([raw[-1] ^ 0xFF])
        return frame(raw)


@pytest.fixture
async def gateway() -> AsyncIterator[FakeGateway]:
    gw = FakeGateway()
    server = await asyncio.start_server(gw.handle, "127.0.0.1", 0)
    gw.port = server.sockets[0].getsockname()[1]
    yield gw
    server.close()
    await server.wait_closed()


ClientFactory = Callable[..., TerminalClient]


@pytest.fixture
async def make_client(gateway: FakeGateway) -> AsyncIterator[ClientFactory]:
    clients: list[TerminalClient] = []

    def make(**kw: object) -> TerminalClient:
        options: dict[str, object] = {
            "terminal_id": TID, "merchant_id": MID, "mac_key": KEY, "timeout_s": 2.0,
        }  # fmt: skip
        client = TerminalClient("127.0.0.1", gateway.port, **(options | kw))  # type: ignore[arg-type]
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def offline_client(**kw: object) -> TerminalClient:
    options: dict[str, object] = {
        "terminal_id": TID, "merchant_id": MID, "mac_key": KEY, "clock": lambda: FIXED,
    }  # fmt: skip
    return TerminalClient("127.0.0.1", 1, **(options | kw))  # type: ignore[arg-type]


# -- request / response ---------------------------------------------------------------------


async def test_request_response(gateway: FakeGateway, make_client: ClientFactory) -> None:
    async with make_client() as client:
        answer = await client.request(client.purchase(CARD, 1250, pin="1234"))
    assert answer.mti == "0210"
    assert answer.response_code == "00"
    assert answer.amount == 1250 and answer.card_no == CARD
    sent = gateway.received[0]
    assert sent.pin_data == pin_block(KEY, CARD, "1234")
    assert sent.terminal_id == TID and sent.merchant_id == MID
    assert answer.stan == sent.stan == "000001"


async def test_every_builder_is_accepted(gateway: FakeGateway, make_client: ClientFactory) -> None:
    async with make_client() as client:
        purchase = client.purchase(CARD, 100)
        hold = client.hold(CARD, 300, pin="0000")
        messages = [
            client.sign_on(),
            purchase,
            client.inquiry(CARD),
            client.offline_advice(CARD, 50),
            client.reversal(purchase),
            hold,
            client.completion(hold, 250),
            client.electricity_purchase(CARD, 1000, "B2-301"),
            client.meter_advice("B2-301", 20),
        ]
        for msg in messages:
            answer = await client.request(msg)
            assert answer.mti == response_mti(msg.mti)
            assert answer.stan == msg.stan
    assert gateway.received == messages
    assert sorted(m.stan or "" for m in messages) == [f"{i:06d}" for i in range(1, 10)]


async def test_concurrent_requests_are_serialised(make_client: ClientFactory) -> None:
    async with make_client() as client:
        sent = [client.purchase(CARD, i) for i in range(1, 21)]
        answers = await asyncio.gather(*(client.request(m) for m in sent))
    assert [a.stan for a in answers] == [m.stan for m in sent]


async def test_timeout(gateway: FakeGateway, make_client: ClientFactory) -> None:
    gateway.mode = "silent"
    client = make_client(timeout_s=0.2)
    await client.connect()
    with pytest.raises(RequestTimeoutError):
        await client.request(client.sign_on())
    # The connection is dropped after a timeout so a late answer cannot be misread.
    with pytest.raises(ConnectionClosedError):
        await client.request(client.sign_on())
    gateway.mode = "echo"
    await client.connect()
    assert (await client.request(client.sign_on())).response_code == "00"


async def test_bad_response_mac(gateway: FakeGateway, make_client: ClientFactory) -> None:
    gateway.mode = "bad_mac"
    async with make_client() as client:
        with pytest.raises(ResponseMacError):
            await client.request(client.sign_on())


async def test_response_mac_under_another_key(make_client: ClientFactory) -> None:
    async with make_client(mac_key=bytes(32)) as client:
        # The double MACs with KEY; this client expects its own key.
        with pytest.raises(ResponseMacError):
            await client.request(client.sign_on())


async def test_missing_response_mac(gateway: FakeGateway, make_client: ClientFactory) -> None:
    gateway.mode = "no_mac"
    async with make_client() as client:
        with pytest.raises(ResponseMacError):
            await client.request(client.sign_on())


async def test_unmaced_63_is_accepted(gateway: FakeGateway, make_client: ClientFactory) -> None:
    gateway.mode = "no_mac_63"
    async with make_client() as client:
        assert (await client.request(client.sign_on())).response_code == "63"


async def test_wrong_stan(gateway: FakeGateway, make_client: ClientFactory) -> None:
    gateway.mode = "wrong_stan"
    async with make_client() as client:
        with pytest.raises(UnexpectedResponseError):
            await client.request(client.sign_on())


async def test_gateway_hangs_up(gateway: FakeGateway, make_client: ClientFactory) -> None:
    gateway.mode = "close"
    async with make_client() as client:
        with pytest.raises(ConnectionClosedError):
            await client.request(client.sign_on())


async def test_bad_response_frame(gateway: FakeGateway, make_client: ClientFactory) -> None:
    gateway.mode = "oversize"
    async with make_client() as client:
        with pytest.raises(MalformedResponseError):
            await client.request(client.sign_on())


async def test_not_connected() -> None:
    client = offline_client()
    with pytest.raises(ConnectionClosedError):
        await client.request(client.sign_on())


async def test_send_raw(make_client: ClientFactory) -> None:
    async with make_client() as client:
        reply = await client.send_raw(encode_message(client.sign_on(), KEY))
        assert reply is not None and decode_message(reply).verify(KEY)
        assert await client.send_raw(b"garbage") is None  # the double hangs up
    async with make_client() as client:
        assert await client.send_raw(b"\x00\x00", framed=False) is None  # zero-length frame


async def test_invalid_message_is_refused_before_sending(make_client: ClientFactory) -> None:
    async with make_client(terminal_id="SHORT") as client:
        with pytest.raises(FormatError):
            await client.request(client.sign_on())


# -- builders (no network) ------------------------------------------------------------------


def test_common_fields_and_time_zones() -> None:
    msg = offline_client().sign_on()
    assert msg.mti == "0800"
    assert msg.transmission_dt == "0315203005"  # UTC
    assert (msg.local_date, msg.local_time) == ("0316", "043005")  # Asia/Shanghai
    assert (msg.terminal_id, msg.merchant_id, msg.stan) == (TID, MID, "000001")
    utc = offline_client(tz="UTC").sign_on()
    assert (utc.local_date, utc.local_time) == ("0315", "203005")


def test_stan_sequence_wraps() -> None:
    client = offline_client()
    assert client.purchase(CARD, 1, stan="424242").stan == "424242"
    stans = [client.next_stan() for _ in range(999_999)]
    assert stans[0] == "000001" and stans[-1] == "999999"
    assert client.next_stan() == "000001"


def test_purchase_inquiry_and_advice() -> None:
    client = offline_client()
    purchase = client.purchase(CARD, 1250, pin="1234")
    assert (purchase.mti, purchase.processing_code, purchase.amount) == ("0200", "000000", 1250)
    assert purchase.pin_data == pin_block(KEY, CARD, "1234")
    assert client.purchase(CARD, 1).pin_data is None
    inquiry = client.inquiry(CARD)
    assert (inquiry.mti, inquiry.processing_code, inquiry.amount) == ("0200", "310000", None)
    advice = client.offline_advice(CARD, 800)
    assert (advice.mti, advice.processing_code, advice.original_data) == ("0220", "000000", None)


def test_reversal_references_the_original() -> None:
    client = offline_client()
    original = client.purchase(CARD, 1250, stan="000010")
    reversal = client.reversal(original)
    assert reversal.mti == "0400"
    assert (reversal.card_no, reversal.amount, reversal.processing_code) == (CARD, 1250, "000000")
    assert reversal.stan != original.stan
    ref = parse_original(reversal.original_data or "")
    assert (ref.mti, ref.stan, ref.transmission_dt) == ("0200", "000010", "0315203005")
    with pytest.raises(ValueError):
        client.reversal(Message(mti="0200", card_no=CARD, amount=1))


def test_hold_and_completion() -> None:
    client = offline_client()
    hold = client.hold(CARD, 2000)
    assert (hold.mti, hold.processing_code, hold.amount) == ("0100", "000000", 2000)
    completion = client.completion(hold, 1500)
    assert (completion.mti, completion.processing_code, completion.amount) == (
        "0220", "000000", 1500,
    )  # fmt: skip
    assert completion.card_no is None
    assert parse_original(completion.original_data or "").stan == hold.stan
    assert client.completion(hold, 1500, card_no=CARD).card_no == CARD


def test_electricity_and_meter() -> None:
    client = offline_client()
    buy = client.electricity_purchase(CARD, 5000, "B2-301")
    assert (buy.mti, buy.processing_code, buy.room_id, buy.card_no) == (
        "0200", "400000", "B2-301", CARD,
    )  # fmt: skip
    meter = client.meter_advice("B2-301", 120)
    assert (meter.mti, meter.processing_code, meter.room_id, meter.amount) == (
        "0220", "410000", "B2-301", 120,
    )  # fmt: skip
    assert meter.card_no is None


def test_a_client_goes_on_from_the_last_stan() -> None:
    c = TerminalClient("127.0.0.1", 1, terminal_id="T1", merchant_id="M1", mac_key=b"k" * 16,
                       last_stan=41)
    assert c.sign_on().stan == "000042"
    wraps = TerminalClient("127.0.0.1", 1, terminal_id="T1", merchant_id="M1",
                           mac_key=b"k" * 16, last_stan=999_999)
    assert wraps.sign_on().stan == "000001"
    with pytest.raises(ValueError):
        TerminalClient("127.0.0.1", 1, terminal_id="T1", merchant_id="M1", mac_key=b"k" * 16,
                       last_stan=1_000_000)
