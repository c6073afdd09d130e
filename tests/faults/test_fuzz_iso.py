"""Hostile ISO 8583 input against the real gateway: random frames, random byte streams with
broken length prefixes, truncated and oversized frames, authenticated garbage (well-formed,
correctly MACed messages with hostile content) and valid purchase frames with a single byte
changed. The gateway must answer or close, never crash, never approve what it should not, and
the campus ledger must not move by a single fen."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from terminals.client import TerminalClient
from terminals.framing import frame
from terminals.iso8583 import FormatError, Message, decode_message, encode_message, encode_original
from tests.faults.conftest import IsoTarget

EXAMPLES = 150
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
REQUEST_MTIS = ["0100", "0200", "0220", "0400", "0800"]
OTHER_MTIS = ["0110", "0210", "0600", "0120", "0420", "0820", "9999"]


def _digits(n: int) -> st.SearchStrategy[str]:
    return st.text(alphabet="0123456789", min_size=n, max_size=n)


dt10 = st.builds(
    lambda mo, d, h, mi, s: f"{mo:02d}{d:02d}{h:02d}{mi:02d}{s:02d}",
    st.integers(1, 12),
    st.integers(1, 28),
    st.integers(0, 23),
    st.integers(0, 59),
    st.integers(0, 59),
)
printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


async def _exchange(port: int, data: bytes, *, wait_s: float = 5) -> bytes:
    """Send raw bytes on a fresh connection; everything the gateway sends back until it
    closes or goes quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = b""
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            writer.write_eof()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(wait_s):
                while chunk := await reader.read(4096):
                    out += chunk
    finally:
        writer.close()
    return out


def _answers(raw: bytes) -> list[Message]:
    """Every framed answer in ``raw`` (each must decode)."""
    out = []
    while raw:
        assert len(raw) >= 2, raw
        n = int.from_bytes(raw[:2], "big")
        payload, raw = raw[2 : 2 + n], raw[2 + n :]
        assert len(payload) == n, "a truncated answer"
        out.append(decode_message(payload).message)
    return out


async def _after(target: IsoTarget, before: Any) -> None:
    assert await target.fingerprint() == before, "garbage moved money"
    t = target.campus.terminals[1]
    async with TerminalClient(
        "127.0.0.1",
        target.port,
        terminal_id=t.terminal_id,
        merchant_id=t.merchant_id,
        mac_key=t.key,
        timeout_s=5,
    ) as c:
        assert (await c.request(c.sign_on())).response_code == "00"  # still serving
    log = target.server.log_text()
    assert "unexpected error" not in log and "Traceback" not in log, target.server.log_tail()


def _run(fuzz: Any) -> None:
    fuzz()


async def test_random_frames_and_streams(iso_target: IsoTarget) -> None:
    before = await iso_target.fingerprint()
    loop = asyncio.get_running_loop()
    port = iso_target.port

    @FUZZ
    @given(
        st.one_of(
            st.binary(min_size=1, max_size=1024).map(frame),
            st.tuples(st.sampled_from(REQUEST_MTIS + OTHER_MTIS), st.binary(max_size=400)).map(
                lambda t: frame(t[0].encode() + t[1])
            ),
            st.binary(max_size=3000),  # unframed: any length prefix at all
            st.binary(min_size=3, max_size=200).map(lambda b: b"\xff\xff" + b),  # oversized
            st.binary(max_size=100).map(lambda b: b"\x00\x00" + b),  # zero-length frame
            st.binary(min_size=1, max_size=300).map(lambda b: frame(b)[: len(b) // 2 + 2]),
        )
    )
    def fuzz(data: bytes) -> None:
        raw = asyncio.run_coroutine_threadsafe(_exchange(port, data, wait_s=3), loop).result()
        answers = _answers(raw)
        seen["closed" if not answers else "answered"] += 1
        for answer in answers:
            assert answer.response_code in ("30", "63", "12"), answer

    seen: Counter[str] = Counter()
    await asyncio.to_thread(_run, fuzz)
    print("\nrandom frames:", dict(seen))
    assert seen["closed"] and seen["answered"] and seen.total() >= EXAMPLES
    await _after(iso_target, before)


@st.composite
def authenticated_garbage(draw: st.DrawFn, target: IsoTarget) -> tuple[Message, bytes]:
    """A well-formed message from a registered terminal, correctly MACed, with hostile
    content: unknown cards (the campus's cards start 88, these 99), odd processing codes,
    amounts from 0 to the field's maximum, originals that never existed, foreign merchants."""
    t = target.campus.terminals[0]
    mti = draw(st.sampled_from([*REQUEST_MTIS, "0600", "0120"]))

    def usually(strategy: st.SearchStrategy[Any]) -> Any:
        # Mostly present: a missing required field stops at the format check (30), and the
        # point here is to get past it into the business rules.
        return draw(
            st.sampled_from([True] * 9 + [False]).flatmap(
                lambda present: strategy if present else st.none()
            )
        )

    msg = Message(
        mti=mti,
        card_no=usually(st.text(alphabet="0123456789", max_size=17).map(lambda s: "99" + s)),
        processing_code=usually(
            st.sampled_from(["000000", "310000", "400000", "410000"]) | _digits(6)
        ),
        amount=usually(st.integers(0, 10**12 - 1)),
        transmission_dt=draw(dt10),
        stan=draw(_digits(6)),
        local_time=usually(st.just("120000")),
        local_date=usually(st.just("0101")),
        terminal_id=t.terminal_id,
        merchant_id=usually(st.just(t.merchant_id))
        or draw(st.text(printable, min_size=15, max_size=15)),
        pin_data=draw(st.none() | st.binary(min_size=8, max_size=8)),
        original_data=draw(
            st.none()
            | st.builds(
                lambda m, s, d: encode_original(m, s, d),
                st.sampled_from(REQUEST_MTIS),
                _digits(6),
                dt10,
            )
        ),
        room_id=draw(st.none() | st.text(printable, min_size=1, max_size=28)),
    )
    try:
        data = encode_message(msg, t.key)
    except FormatError:
        assume(False)
        raise
    return msg, data


async def test_authenticated_garbage(iso_target: IsoTarget) -> None:
    before = await iso_target.fingerprint()
    loop = asyncio.get_running_loop()
    port = iso_target.port

    @FUZZ
    @given(authenticated_garbage(iso_target))
    def fuzz(case: tuple[Message, bytes]) -> None:
        msg, data = case
        raw = asyncio.run_coroutine_threadsafe(_exchange(port, frame(data)), loop).result()
        answers = _answers(raw)
        assert len(answers) <= 1
        seen.update(a.response_code or "" for a in answers)
        for a in answers:
            code = a.response_code
            assert code != "96", (msg, a)
            # Only a sign-on and a reversal (always 00, and remembered) may be approved here:
            # no card exists, no original exists.
            assert code != "00" or msg.mti in ("0800", "0400"), (msg, a)

    seen: Counter[str] = Counter()
    await asyncio.to_thread(_run, fuzz)
    print("\nauthenticated garbage:", dict(seen))
    assert len(seen) >= 4, seen  # it reached past the MAC into the business rules
    await _after(iso_target, before)


async def test_one_changed_byte_is_never_approved(iso_target: IsoTarget) -> None:
    """A real, funded card's valid purchase frame, with one byte changed, truncated or
    extended: the MAC must catch it (63) or the format must (30); nothing is ever posted."""
    before = await iso_target.fingerprint()
    t = iso_target.campus.terminals[0]
    holder = iso_target.campus.holders[0]
    client = TerminalClient(
        "127.0.0.1",
        iso_target.port,
        terminal_id=t.terminal_id,
        merchant_id=t.merchant_id,
        mac_key=t.key,
    )
    loop = asyncio.get_running_loop()
    port = iso_target.port

    @FUZZ
    @given(
        st.data(),
        st.sampled_from(["flip", "truncate", "extend"]),
    )
    def fuzz(data: st.DataObject, how: str) -> None:
        valid = encode_message(client.purchase(holder.card_no, 100), t.key)
        if how == "flip":
            i = data.draw(st.integers(0, len(valid) - 1))
            bad = valid[:i] + bytes([valid[i] ^ data.draw(st.integers(1, 255))]) + valid[i + 1 :]
        elif how == "truncate":
            bad = valid[: data.draw(st.integers(1, len(valid) - 1))]
        else:
            bad = valid + data.draw(st.binary(min_size=1, max_size=40))
        assert bad != valid
        raw = asyncio.run_coroutine_threadsafe(_exchange(port, frame(bad)), loop).result()
        for a in _answers(raw):
            assert a.response_code in ("30", "63"), (how, a)
            seen[a.response_code or ""] += 1

    seen: Counter[str] = Counter()
    await asyncio.to_thread(_run, fuzz)
    print("\none changed byte:", dict(seen))
    assert seen["63"] > 0
    await _after(iso_target, before)


@pytest.mark.parametrize("prefix", [b"\x00\x00", b"\x04\x01", b"\xff\xff"])
async def test_bad_length_prefixes_close_the_line(iso_target: IsoTarget, prefix: bytes) -> None:
    """A zero or oversized length is refused before reading (the line closes, no answer)."""
    raw = await _exchange(iso_target.port, prefix + b"0800" + b"\x00" * 64)
    assert raw == b""
