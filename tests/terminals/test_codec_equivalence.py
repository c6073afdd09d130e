"""The specialised codec (terminals/iso8583/codec.py) against its reference, the profile on top
of pyiso8583 (terminals/iso8583/reference.py): every message of the profile encodes to the
same bytes and decodes to the same frame in both, every mutated frame is refused by both or
by neither (and decodes the same when both accept it), and every message is refused by both
encoders or by neither."""

from __future__ import annotations

import itertools
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.limits import ISO8583_CACHED_PLANS
from terminals.iso8583 import DecodedFrame, FormatError, Message, codec, reference
from tests.terminals.test_iso8583 import FLOWS, KEY, messages

_PROFILE = [2, 3, 4, 7, 11, 12, 13, 37, 38, 39, 41, 42, 52, 54, 64, 90, 102, 128]


def _decoded(decode: Any, raw: bytes) -> DecodedFrame | str:
    try:
        frame: DecodedFrame = decode(raw)
    except FormatError as e:
        assert e.reason
        return "refused"
    return frame


def assert_decode_alike(raw: bytes) -> DecodedFrame | str:
    """Both decoders give the same frame or both refuse (the fast one twice: its plan of the
    bitmaps is looked up the second time, not built)."""
    expected = _decoded(reference.decode_message, raw)
    assert _decoded(codec.decode_message, raw) == expected
    assert _decoded(codec.decode_message, bytearray(raw)) == expected
    return expected


def _encoded(encode: Any, *args: Any) -> bytes | str:
    try:
        raw: bytes = encode(*args)
    except FormatError as e:
        assert e.reason
        return "refused"
    return raw


def assert_encode_alike(msg: Message) -> bytes | str:
    """Both encoders give the same bytes (MACed and not) or both refuse."""
    expected = _encoded(reference.encode_message, msg, KEY)
    assert _encoded(codec.encode_message, msg, KEY) == expected
    assert _encoded(codec.encode_message_unmac, msg) == _encoded(
        reference.encode_message_unmac, msg)
    return expected


# -- every message of the profile ---------------------------------------------------------


@pytest.mark.parametrize("name", FLOWS)
def test_every_flow_is_byte_identical(name: str) -> None:
    raw = assert_encode_alike(FLOWS[name])
    assert isinstance(raw, bytes)
    frame = assert_decode_alike(raw)
    assert isinstance(frame, DecodedFrame) and frame.message == FLOWS[name] and frame.verify(KEY)


@settings(max_examples=400)
@given(msg=messages, key=st.binary(min_size=1, max_size=64))
def test_property_every_message_encodes_and_decodes_alike(msg: Message, key: bytes) -> None:
    raw = codec.encode_message(msg, key)
    assert raw == reference.encode_message(msg, key)
    unmac = codec.encode_message_unmac(msg)
    assert unmac == reference.encode_message_unmac(msg)
    for data in (raw, unmac):
        frame = assert_decode_alike(data)
        assert isinstance(frame, DecodedFrame) and frame.message == msg
    assert codec.decode_message(raw).verify(key)


# -- mutated frames -----------------------------------------------------------------------


def _mutate(raw: bytearray, data: st.DataObject) -> None:
    """One mutation: a byte changed, a bitmap bit flipped, the frame cut or extended, a byte
    inserted or deleted."""
    action = data.draw(st.sampled_from(["byte", "bit", "cut", "extend", "insert", "delete"]))
    if action == "bit":  # a bit of the primary bitmap, or of the secondary when present
        bits = min(128 if len(raw) > 4 and raw[4] & 0x80 else 64, 8 * (len(raw) - 4))
        if bits > 0:
            i = data.draw(st.integers(0, bits - 1))
            raw[4 + i // 8] ^= 0x80 >> (i % 8)
    elif action == "cut":
        del raw[data.draw(st.integers(0, len(raw))) :]
    elif action == "extend":
        raw.extend(data.draw(st.binary(min_size=1, max_size=30)))
    elif raw:
        i = data.draw(st.integers(0, len(raw) - 1))
        if action == "byte":
            raw[i] = data.draw(st.integers(0, 255))
        elif action == "insert":
            raw.insert(i, data.draw(st.integers(0, 255)))
        else:
            del raw[i]


@settings(max_examples=500)
@given(msg=messages, mac=st.booleans(), data=st.data())
def test_property_mutated_frames_are_refused_alike(
    msg: Message, mac: bool, data: st.DataObject
) -> None:
    raw = bytearray(codec.encode_message(msg, KEY) if mac else codec.encode_message_unmac(msg))
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate(raw, data)
    assert_decode_alike(bytes(raw))


@settings(max_examples=300)
@given(
    mti=st.binary(min_size=4, max_size=4) | st.just(b"0200"),
    fields=st.sets(st.sampled_from(_PROFILE)),
    tail=st.binary(max_size=200),
)
def test_property_bitmaps_of_the_profile_with_any_tail(
    mti: bytes, fields: set[int], tail: bytes
) -> None:
    bitmap = sum(1 << (128 - f) for f in fields | ({1} if max(fields, default=0) > 64 else set()))
    head = bitmap.to_bytes(16, "big")
    assert_decode_alike(mti + (head if bitmap >> 127 else head[:8]) + tail)


@pytest.mark.parametrize("prefix", [b" 9", b"9 ", b"+9", b"09", b"-9", b"\t9", b"9\n"])
def test_length_digits_are_digits_in_both(prefix: bytes) -> None:
    """The library reads a length prefix with int(), which takes " 9" and "+9": the profile
    does not (ASCII length digits), and neither codec does."""
    raw = codec.encode_message(Message(mti="0200", card_no="123456789"), KEY)
    assert raw[12:14] == b"09"
    frame = assert_decode_alike(raw[:12] + prefix + raw[14:])
    assert (frame == "refused") is (prefix != b"09")


# -- messages either encoder refuses ------------------------------------------------------

_text = st.text(st.characters(max_codepoint=0x7F), max_size=44) | st.text(max_size=4)
_loose = st.builds(
    Message,
    mti=st.sampled_from(["0200", "0210", "1200", "020", "02A0"]),
    **{name: st.none() | _text for name in Message.__struct_fields__[1:] if name not in (
        "amount", "pin_data")},
    amount=st.none() | st.integers(-1, 10**12) | st.booleans(),
    pin_data=st.none() | st.binary(max_size=9) | st.just("0" * 16),
)


@settings(max_examples=1000)
@given(msg=_loose)
def test_property_loose_messages_are_refused_alike(msg: Message) -> None:
    assert_encode_alike(msg)


def _one_field(attr: str, value: str) -> Message:
    return Message(mti="0200", **{attr: value})


@pytest.mark.parametrize(("attr", "width"), [("local_date", 4), ("local_time", 6)])
def test_every_date_and_time_is_judged_alike(attr: str, width: int) -> None:
    """Every MMDD, and every hhmm (with ss 00) and ss: the date rules are written twice, as
    expressions in the codec and as Python in the reference."""
    values = [f"{i:04d}" for i in range(10_000)]
    if width == 6:
        values = [v + "00" for v in values] + [f"0000{i:02d}" for i in range(100)]
    accepted = [v for v in values if assert_encode_alike(_one_field(attr, v)) != "refused"]
    assert len(accepted) == (366 if width == 4 else 24 * 60 + 60)


# a field 54 block: well-formed (most of the time) or a near miss
_block = st.builds(
    "{}{}{}{}{:012d}".format,
    st.text("0123456789", min_size=2, max_size=2) | st.just("1x"),
    st.text("0123456789", min_size=2, max_size=2),
    st.text("0123456789", min_size=3, max_size=3),
    st.sampled_from("CDCDCD+ "),
    st.integers(0, 10**12 - 1),
)


@settings(max_examples=500)
@given(
    blocks=st.lists(_block, max_size=7).map("".join) | st.text("0123456789CD+ x", max_size=150),
    original=st.text("0123456789 x", min_size=40, max_size=44),
    dt=st.text("0123456789", min_size=10, max_size=10),
)
def test_property_value_rules_are_judged_alike(blocks: str, original: str, dt: str) -> None:
    assert_encode_alike(_one_field("additional_amounts", blocks))
    assert_encode_alike(_one_field("original_data", original))
    for pad in ("0" * 22, "0" * 21 + dt[-1], dt[0] + "0" * 21):
        assert_encode_alike(_one_field("original_data", original[:20] + pad))
    assert_encode_alike(_one_field("transmission_dt", dt))


# -- the plan cache -----------------------------------------------------------------------


def test_the_plans_remembered_are_bounded() -> None:
    """A peer sending ever new bitmaps fills no memory, and decoding goes on past the bound."""
    low = [f for f in _PROFILE if f < 64]
    for fields in itertools.islice(itertools.combinations(low, 6), ISO8583_CACHED_PLANS + 50):
        bitmap = sum(1 << (64 - f) for f in fields).to_bytes(8, "big")
        with pytest.raises(FormatError):
            codec.decode_message(b"0200" + bitmap)  # the header is valid, the fields missing
    assert len(codec._plans) == ISO8583_CACHED_PLANS
    msg = msgspec.structs.replace(FLOWS["purchase"], card_no="6222000011113333")
    assert codec.decode_message(codec.encode_message(msg, KEY)).message == msg
