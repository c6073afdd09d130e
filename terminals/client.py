"""The project's own terminal client for the ISO 8583 gateway (contract §5).

One outstanding request per client: ``request`` holds a lock for the whole exchange, so
concurrent callers queue instead of interleaving frames. After a timeout, EOF or framing
error the connection is closed (a late answer could otherwise be read as the next one);
call ``connect()`` again to continue. Builders only build a Message; send it with
``request``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Final, Self
from zoneinfo import ZoneInfo

from terminals.framing import MAX_FRAME_BYTES, FrameError, frame, read_frame
from terminals.iso8583 import (
    FormatError,
    Message,
    Mti,
    ProcessingCode,
    ResponseCode,
    decode_message,
    encode_message,
    encode_original,
    response_mti,
)
from terminals.mac import pin_block

__all__ = [
    "ClientError",
    "ConnectionClosedError",
    "MalformedResponseError",
    "RequestTimeoutError",
    "ResponseMacError",
    "TerminalClient",
    "UnexpectedResponseError",
]

_STAN_MAX: Final = 999_999
# The gateway cannot MAC when it does not know the terminal's key: the unknown-terminal
# answer (63) and a format error on a frame it could not attribute (30).
_UNMACCED_OK: Final = frozenset({ResponseCode.MAC_FAILURE, ResponseCode.FORMAT_ERROR})


class ClientError(Exception):
    """Base of every error raised by TerminalClient."""


class RequestTimeoutError(ClientError):
    """No complete answer arrived within the client's timeout."""


class ConnectionClosedError(ClientError):
    """Not connected, or the gateway closed the connection without answering."""


class MalformedResponseError(ClientError):
    """The answer was not a valid frame or message of the profile."""


class ResponseMacError(ClientError):
    """The answer's MAC is wrong, or missing where the contract requires one."""


class UnexpectedResponseError(ClientError):
    """The answer does not belong to the request (MTI or STAN mismatch)."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


class TerminalClient:
    """An async ISO 8583 terminal: builds, MACs, sends and checks messages."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        terminal_id: str,
        merchant_id: str,
        mac_key: bytes,
        timeout_s: float = 5.0,
        tz: str = "Asia/Shanghai",
        max_frame: int = MAX_FRAME_BYTES,
        clock: Callable[[], datetime] = _utc_now,
        last_stan: int = 0,
    ) -> None:
        """Configure the client; ``clock`` must return an aware datetime. ``last_stan``: the
        STAN the terminal used last (a terminal that restarts goes on from it; the next
        message takes the one after)."""
        self.host = host
        self.port = port
        self.terminal_id = terminal_id
        self.merchant_id = merchant_id
        self.timeout_s = timeout_s
        self._mac_key = mac_key
        self._tz = ZoneInfo(tz)
        self._max_frame = max_frame
        self._clock = clock
        if not 0 <= last_stan <= _STAN_MAX:
            raise ValueError(f"last_stan must be 0..{_STAN_MAX}")
        self._stan = last_stan
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    # -- connection ------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the TCP connection (closing any previous one)."""
        await self.close()
        try:
            async with asyncio.timeout(self.timeout_s):
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        except TimeoutError as exc:
            raise RequestTimeoutError(f"connect to {self.host}:{self.port} timed out") from exc

    async def close(self) -> None:
        """Close the connection; safe to call when not connected."""
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- exchanges -------------------------------------------------------------------

    async def request(self, msg: Message) -> Message:
        """Send ``msg`` with a MAC and return the verified answer.

        Raises RequestTimeoutError, ConnectionClosedError, MalformedResponseError,
        ResponseMacError or UnexpectedResponseError; FormatError if ``msg`` is invalid.
        """
        data = frame(encode_message(msg, self._mac_key))
        async with self._lock:
            payload = await self._exchange(data)
        if payload is None:
            raise ConnectionClosedError("gateway closed the connection without answering")
        try:
            decoded = decode_message(payload)
        except FormatError as exc:
            raise MalformedResponseError(f"bad response: {exc.reason}") from exc
        answer = decoded.message
        if decoded.mac is None:
            if answer.response_code not in _UNMACCED_OK:
                raise ResponseMacError(f"response {answer.response_code!r} carries no MAC")
        elif not decoded.verify(self._mac_key):
            raise ResponseMacError("response MAC does not verify")
        _check_pairing(msg, answer)
        return answer

    async def send_raw(self, data: bytes, *, framed: bool = True) -> bytes | None:
        """Send arbitrary bytes and return the next frame's payload, or None on EOF.

        With ``framed`` the bytes get a length prefix; without, they go out verbatim (for
        tests of the framing itself). Nothing is MACed, decoded or checked.
        """
        async with self._lock:
            return await self._exchange(frame(data) if framed else data)

    async def _exchange(self, data: bytes) -> bytes | None:
        if self._reader is None or self._writer is None:
            raise ConnectionClosedError("not connected")
        reader, writer = self._reader, self._writer
        try:
            async with asyncio.timeout(self.timeout_s):
                writer.write(data)
                await writer.drain()
                payload = await read_frame(reader, max_len=self._max_frame)
        except TimeoutError as exc:
            await self.close()
            raise RequestTimeoutError(f"no answer within {self.timeout_s} s") from exc
        except FrameError as exc:
            await self.close()
            raise MalformedResponseError(f"bad response frame: {exc.reason}") from exc
        except ConnectionError as exc:
            await self.close()
            raise ConnectionClosedError(f"connection lost: {exc}") from exc
        if payload is None:
            await self.close()
        return payload

    # -- builders --------------------------------------------------------------------

    def next_stan(self) -> str:
        """Return the next STAN: 000001, 000002, ... 999999, then 000001 again."""
        self._stan = self._stan % _STAN_MAX + 1
        return f"{self._stan:06d}"

    def sign_on(self, *, stan: str | None = None) -> Message:
        """0800 sign-on / echo."""
        return self._build(Mti.NETWORK, None, stan)

    def purchase(
        self, card_no: str, amount: int, *, pin: str | None = None, stan: str | None = None
    ) -> Message:
        """0200 purchase (processing code 000000)."""
        return self._build(
            Mti.FINANCIAL,
            ProcessingCode.PURCHASE,
            stan,
            card_no=card_no,
            amount=amount,
            pin_data=self._pin(card_no, pin),
        )

    def inquiry(self, card_no: str, *, pin: str | None = None, stan: str | None = None) -> Message:
        """0200 balance inquiry (processing code 310000, no amount)."""
        return self._build(
            Mti.FINANCIAL,
            ProcessingCode.INQUIRY,
            stan,
            card_no=card_no,
            pin_data=self._pin(card_no, pin),
        )

    def offline_advice(self, card_no: str, amount: int, *, stan: str | None = None) -> Message:
        """0220 offline purchase advice (processing code 000000, no field 90)."""
        return self._build(
            Mti.ADVICE, ProcessingCode.PURCHASE, stan, card_no=card_no, amount=amount
        )

    def reversal(self, original: Message, *, stan: str | None = None) -> Message:
        """0400 reversal of ``original``: same card, amount, processing code and room."""
        return self._build(
            Mti.REVERSAL,
            original.processing_code,
            stan,
            card_no=original.card_no,
            amount=original.amount,
            room_id=original.room_id,
            original_data=_original_of(original),
        )

    def hold(
        self, card_no: str, amount: int, *, pin: str | None = None, stan: str | None = None
    ) -> Message:
        """0100 hot-water hold of ``amount``."""
        return self._build(
            Mti.AUTHORIZATION,
            ProcessingCode.PURCHASE,
            stan,
            card_no=card_no,
            amount=amount,
            pin_data=self._pin(card_no, pin),
        )

    def completion(
        self,
        original_hold: Message,
        amount: int,
        *,
        card_no: str | None = None,
        stan: str | None = None,
    ) -> Message:
        """0220 completion of ``original_hold`` for the actual ``amount`` (field 2 optional)."""
        return self._build(
            Mti.ADVICE,
            ProcessingCode.PURCHASE,
            stan,
            card_no=card_no,
            amount=amount,
            original_data=_original_of(original_hold),
        )

    def electricity_purchase(
        self,
        card_no: str,
        amount: int,
        room_id: str,
        *,
        pin: str | None = None,
        stan: str | None = None,
    ) -> Message:
        """0200 electricity purchase (400000) for ``room_id`` from the card's cash purse."""
        return self._build(
            Mti.FINANCIAL,
            ProcessingCode.ELECTRICITY_PURCHASE,
            stan,
            card_no=card_no,
            amount=amount,
            room_id=room_id,
            pin_data=self._pin(card_no, pin),
        )

    def meter_advice(self, room_id: str, amount: int, *, stan: str | None = None) -> Message:
        """0220 room meter advice (410000): energy used by ``room_id``, no card."""
        return self._build(
            Mti.ADVICE, ProcessingCode.ROOM_METER, stan, room_id=room_id, amount=amount
        )

    def _pin(self, card_no: str, pin: str | None) -> bytes | None:
        return None if pin is None else pin_block(self._mac_key, card_no, pin)

    def _build(
        self,
        mti: str,
        processing_code: str | None,
        stan: str | None,
        *,
        card_no: str | None = None,
        amount: int | None = None,
        pin_data: bytes | None = None,
        original_data: str | None = None,
        room_id: str | None = None,
    ) -> Message:
        now = self._clock()
        utc, local = now.astimezone(UTC), now.astimezone(self._tz)
        return Message(
            mti=str(mti),
            card_no=card_no,
            processing_code=None if processing_code is None else str(processing_code),
            amount=amount,
            transmission_dt=utc.strftime("%m%d%H%M%S"),
            stan=self.next_stan() if stan is None else stan,
            local_time=local.strftime("%H%M%S"),
            local_date=local.strftime("%m%d"),
            terminal_id=self.terminal_id,
            merchant_id=self.merchant_id,
            pin_data=pin_data,
            original_data=original_data,
            room_id=room_id,
        )


def _original_of(original: Message) -> str:
    if original.stan is None or original.transmission_dt is None:
        raise ValueError("the original message needs fields 11 and 7")
    return encode_original(original.mti, original.stan, original.transmission_dt)


def _check_pairing(request: Message, answer: Message) -> None:
    # One request is outstanding, so any other answer means the gateway (or a test double)
    # mixed up conversations; surfacing it beats returning someone else's result.
    try:
        expected = response_mti(request.mti)
    except ValueError:
        expected = answer.mti  # not a request MTI: nothing to pair it with
    if answer.mti != expected:
        raise UnexpectedResponseError(f"expected MTI {expected}, got {answer.mti}")
    if answer.stan is not None and request.stan is not None and answer.stan != request.stan:
        raise UnexpectedResponseError(f"expected STAN {request.stan}, got {answer.stan}")
