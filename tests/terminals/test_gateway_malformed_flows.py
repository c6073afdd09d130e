"""Malformed frames from a registered terminal, on the real campus (contract §5): every answer
echoes fields 11 and 41 and carries the terminal's MAC, and none of them moves money.

The frames are a real reversal (and a real purchase) broken on the wire in each way a frame
can be malformed while field 41 stays readable; the campus, batcher and PostgreSQL are real
(the fixtures of test_gateway_flows.py), so a refusal that moved money would show in the
purses. test_gateway_answers.py runs the same shapes against a terminal registry double.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from terminals.iso8583 import Message, decode_message, encode_message, encode_message_unmac
from terminals.mac import MAC_LEN, compute_mac
from tests.terminals.test_gateway_flows import World, campus, gateway, w

__all__ = ["campus", "gateway", "w"]  # fixtures, used by name

_MTI = 4
_PRIMARY = slice(4, 12)
_ORIGINAL_LEN = 42  # field 90, the last field of a purchase's reversal before its MAC


def _set_bit(raw: bytes, field: int) -> bytes:
    """``raw`` with the primary bitmap bit of ``field`` (1..64) set as well."""
    out = bytearray(raw)
    out[_MTI + (field - 1) // 8] |= 0x80 >> ((field - 1) % 8)
    return bytes(out)


def mac_in_64_before_90(msg: Message, key: bytes) -> bytes:
    """The issue's frame: a secondary bitmap (field 90), the MAC in field 64 (which the wire
    puts before 90) over everything before it, field 128 missing."""
    unmac = encode_message_unmac(msg)
    head, original = _set_bit(unmac[:-_ORIGINAL_LEN], 64), unmac[-_ORIGINAL_LEN:]
    return head + compute_mac(key, head) + original


def mac_in_64_and_128(msg: Message, key: bytes) -> bytes:
    """Field 64 set too in a frame MACed in 128: a MAC-sized field before the last one."""
    unmac = encode_message_unmac(msg)
    head = _set_bit(unmac[:-_ORIGINAL_LEN], 64) + bytes(MAC_LEN) + unmac[-_ORIGINAL_LEN:]
    return _mac(head, key)


def _mac(unmac: bytes, key: bytes) -> bytes:
    """An unMACed frame MACed properly: field 128 with a secondary bitmap, else 64."""
    out = bytearray(unmac)
    if out[_MTI] & 0x80:
        out[_MTI + 15] |= 0x01  # field 128, the last bit of the secondary bitmap
    else:
        out[_MTI + 7] |= 0x01  # field 64, the last bit of the primary one
    return bytes(out) + compute_mac(key, bytes(out))


def with_mti(mti: str) -> Callable[[Message, bytes], bytes]:
    """The message under another MTI, MACed properly."""
    return lambda msg, key: _mac(mti.encode() + encode_message_unmac(msg)[_MTI:], key)


# (case, frame from the message and key, expected field 39)
Case = tuple[str, Callable[[Message, bytes], bytes], str]
ANY: list[Case] = [
    ("MAC missing", lambda m, k: encode_message_unmac(m), "63"),
    ("MAC wrong", lambda m, k: encode_message(m, bytes(32)), "63"),
    ("bytes after the MAC", lambda m, k: encode_message(m, k) + b"0", "30"),
    ("truncated inside the MAC", lambda m, k: encode_message(m, k)[:-3], "30"),
    ("truncated before the MAC", lambda m, k: encode_message(m, k)[:-20], "30"),
    ("bad bitmap: field 60 flagged", lambda m, k: _set_bit(encode_message(m, k), 60), "30"),
    ("unknown MTI 0600", with_mti("0600"), "12"),
    ("unknown MTI 0300 with the MAC missing",
     lambda m, k: b"0300" + encode_message_unmac(m)[_MTI:], "63"),
]
REVERSAL_ONLY: list[Case] = [
    ("MAC in 64 with a secondary bitmap, 128 missing", mac_in_64_before_90, "30"),
    ("MAC in 64 and in 128", mac_in_64_and_128, "30"),
    ("bad field 90 (not padded with zeros)",
     lambda m, k: _mac(encode_message_unmac(m)[:-1] + b"7", k), "30"),
]


def _response_mti(frame: bytes) -> str:
    return f"{frame[:2].decode()}{int(frame[2:3]) + 1}{frame[3:4].decode()}"


@pytest.mark.parametrize(
    ("case", "make", "code"), REVERSAL_ONLY + ANY, ids=[c[0] for c in REVERSAL_ONLY + ANY]
)
async def test_a_broken_reversal_is_answered_with_a_mac_and_moves_nothing(
    w: World, case: str, make: Callable[[Message, bytes], bytes], code: str
) -> None:
    p = await w.person(cash=5_000)
    original = w.pos.purchase(p.card, 1_000)
    assert (await w.pos.request(original)).response_code == "00"
    rev = w.pos.reversal(original)
    sent = make(rev, w.key)
    raw = await w.pos.send_raw(sent)
    assert raw is not None, f"{case}: closed without an answer"
    answer = decode_message(raw)
    assert answer.verify(w.key), f"{case}: the answer carries no valid MAC"
    msg = answer.message
    assert (msg.mti, msg.response_code) == (_response_mti(sent), code), case
    assert (msg.terminal_id, msg.stan, msg.transmission_dt) == (
        w.pos.terminal_id, rev.stan, rev.transmission_dt), case
    assert await w.purses(p) == (4_000, 0), f"{case}: money moved"
    # the genuine reversal still goes through: the refusal left nothing behind. A 12 is a
    # decided answer, remembered under the request's key (terminal, STAN, field 7) like any
    # other: the same key with other content is then 94 (§5), and still moves nothing.
    again = await w.pos.request(rev)
    assert again.response_code == ("94" if code == "12" else "00"), case
    assert await w.purses(p) == ((4_000, 0) if code == "12" else (5_000, 0))


@pytest.mark.parametrize(("case", "make", "code"), ANY, ids=[c[0] for c in ANY])
async def test_a_broken_purchase_is_answered_with_a_mac_and_moves_nothing(
    w: World, case: str, make: Callable[[Message, bytes], bytes], code: str
) -> None:
    p = await w.person(cash=5_000)
    purchase = w.pos.purchase(p.card, 1_000)
    raw = await w.pos.send_raw(make(purchase, w.key))
    assert raw is not None, f"{case}: closed without an answer"
    answer = decode_message(raw)
    assert answer.verify(w.key), f"{case}: the answer carries no valid MAC"
    assert (answer.message.response_code, answer.message.terminal_id, answer.message.stan) == (
        code, w.pos.terminal_id, purchase.stan), case
    assert await w.purses(p) == (5_000, 0), f"{case}: money moved"
