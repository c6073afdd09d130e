"""Every answer to a known terminal carries a MAC (contract §5), malformed frames included.

A frame the profile refuses (a bad field value, the MAC misplaced or missing, bytes after the
MAC, a truncated field, a bad bitmap, an MTI the profile does not offer) is still answered with
fields 11 and 41 echoed and the MAC of the terminal field 41 names, as long as 41 can be read
and names a known terminal: only then can the terminal trust the answer. A frame naming no
known terminal gets its answer without a MAC. Over real TCP against the gateway of
test_gateway.py (its terminal registry double: no money flow is ever reached here).
"""

from __future__ import annotations

import contextlib

import iso8583 as pyiso8583
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from terminals.framing import frame
from terminals.iso8583 import (
    SPEC,
    FormatError,
    Message,
    decode_message,
    encode_message,
    encode_message_unmac,
    salvage,
)
from terminals.mac import MAC_LEN, compute_mac, verify_mac
from tests.terminals.test_gateway import (  # the gateway and its registry double
    KEY,
    MID,
    TID,
    GatewayFactory,
    make_gateway,
    raw_exchange,
)
from tests.terminals.test_iso8583 import messages

__all__ = ["make_gateway"]  # a fixture, used by name

STAN = "004711"
DT = "0315203005"


def fields(*, tid: str = TID, mti: str = "0200", **extra: str) -> dict[str, str]:
    """A purchase as pyiso8583 wire text, ``extra`` added or replacing fields."""
    doc = {"t": mti, "2": "6222000011112222", "3": "000000", "4": "000000000100", "7": DT,
           "11": STAN, "12": "120000", "13": "0315", "41": tid, "42": MID}
    doc.update(extra)
    return doc


def forged(doc: dict[str, str], *, mac: str | None = "64") -> bytes:
    """``doc`` encoded by the library alone (none of the profile's checks), with a MAC field
    ``mac`` whose value is right under KEY when that field comes last."""
    doc = dict(doc)
    if mac is not None:
        doc[mac] = "00" * MAC_LEN
    raw = bytes(pyiso8583.encode(doc, SPEC)[0])
    if mac is None:
        return raw
    return raw[:-MAC_LEN] + compute_mac(KEY, raw[:-MAC_LEN])


def _valid(tid: str = TID) -> bytes:
    return forged(fields(tid=tid))


def _flag(raw: bytes, field: int) -> bytes:
    """``raw`` with the primary bitmap bit of ``field`` set as well (no data added)."""
    out = bytearray(raw)
    out[4 + (field - 1) // 8] |= 0x80 >> ((field - 1) % 8)
    return bytes(out)


def _empty_secondary(raw: bytes) -> bytes:
    """``raw`` claiming a secondary bitmap, all zeros (no field above 64)."""
    return _flag(raw, 1)[:12] + bytes(8) + raw[12:]


def _cut_in_field_42(raw: bytes) -> bytes:
    return raw[: raw.index(MID.encode()) + 5]


def _flag_high(raw: bytes, field: int) -> bytes:
    """``raw`` (with a secondary bitmap) with the secondary bit of ``field`` set as well."""
    out = bytearray(raw)
    out[12 + (field - 65) // 8] |= 0x80 >> ((field - 65) % 8)
    return bytes(out)


# field 90 of a reversal of the purchase of fields(): original MTI, STAN, field 7, zeros
ORIGINAL = f"0200{STAN}{DT}" + "0" * 22


# (case, frame from a given terminal id, expected response MTI and field 39)
CASES = [
    ("bad field value: field 12 = 250000",
     lambda tid: forged(fields(tid=tid, **{"12": "250000"})), "0210", "30"),
    ("MAC in 64 with a secondary bitmap, no 128",
     lambda tid: forged(fields(tid=tid, **{"102": "A-101"})), "0210", "30"),
    ("a 0400 with field 90 and its MAC in 64, no 128 (issue 15)",
     lambda tid: forged(fields(tid=tid, mti="0400", **{"90": ORIGINAL})), "0410", "30"),
    ("bad bitmap: the secondary flags field 100, outside the profile",
     lambda tid: _flag_high(forged(fields(tid=tid, **{"102": "A-101"}), mac="128"), 100),
     "0210", "30"),
    ("a field after the MAC (64, then 102, then 128)",
     lambda tid: forged(fields(tid=tid, **{"64": "00" * 8, "102": "A-101"}), mac="128"),
     "0210", "30"),
    ("bytes after the MAC", lambda tid: _valid(tid) + b"XYZ", "0210", "30"),
    ("truncated inside field 42", lambda tid: _cut_in_field_42(_valid(tid)), "0210", "30"),
    ("truncated inside the MAC", lambda tid: _valid(tid)[:-3], "0210", "30"),
    ("bad bitmap: field 60 is not in the profile",
     lambda tid: _flag(_valid(tid), 60), "0210", "30"),
    ("bad bitmap: a secondary bitmap without fields above 64",
     lambda tid: _empty_secondary(_valid(tid)), "0210", "30"),
    ("unknown request MTI with a bad field",
     lambda tid: forged(fields(tid=tid, mti="0300", **{"12": "250000"})), "0310", "30"),
    ("MAC missing", lambda tid: forged(fields(tid=tid), mac=None), "0210", "63"),
    ("MAC missing with a secondary bitmap",
     lambda tid: forged(fields(tid=tid, **{"102": "A-101"}), mac=None), "0210", "63"),
    ("unknown request MTI", lambda tid: forged(fields(tid=tid, mti="0600")), "0610", "12"),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize(("case", "make", "mti", "code"), CASES, ids=IDS)
async def test_known_terminal_gets_a_maced_answer_echoing_11_and_41(
    make_gateway: GatewayFactory, case: str, make: object, mti: str, code: str
) -> None:
    gw, _ = await make_gateway()
    assert callable(make)
    payload = await raw_exchange(gw.port, frame(make(TID)))
    assert payload is not None, case
    answer = decode_message(payload)
    msg = answer.message
    assert (msg.mti, msg.response_code) == (mti, code), case
    assert (msg.terminal_id, msg.stan, msg.transmission_dt) == (TID, STAN, DT), case
    assert answer.mac is not None, f"{case}: answered without a MAC"
    assert verify_mac(KEY, answer.mac_data, answer.mac), f"{case}: the answer's MAC is wrong"


@pytest.mark.parametrize(("case", "make", "mti", "code"), CASES[:11], ids=IDS[:11])
async def test_unknown_terminal_gets_30_without_mac(
    make_gateway: GatewayFactory, case: str, make: object, mti: str, code: str
) -> None:
    """Format comes first (30), and there is no key to MAC it with."""
    gw, _ = await make_gateway()
    assert callable(make)
    payload = await raw_exchange(gw.port, frame(make("NOBODY01")))
    assert payload is not None, case
    answer = decode_message(payload)
    assert (answer.message.response_code, answer.mac) == ("30", None), case
    assert answer.message.terminal_id == "NOBODY01"


@pytest.mark.parametrize("mti", ["0210", "0810", "1200", "2200"])
async def test_a_frame_without_an_answer_mti_is_never_answered(
    make_gateway: GatewayFactory, mti: str
) -> None:
    """An answer MTI (a response is never answered) or another version of ISO 8583 (whose
    answer the 1987 profile cannot carry): no answer at all, so none without a MAC either,
    even with field 41 readable and known."""
    gw, _ = await make_gateway()
    assert await raw_exchange(gw.port, frame(forged(fields(mti=mti)))) is None
    assert await raw_exchange(gw.port, frame(forged(fields(mti=mti, **{"12": "250000"})))) is None


async def test_unreadable_field_41_gets_30_without_mac(make_gateway: GatewayFactory) -> None:
    """Field 32 (outside the profile, length unknown) before 41: 41 cannot be found."""
    gw, _ = await make_gateway()
    payload = await raw_exchange(gw.port, frame(_flag(_valid(), 32)))
    assert payload is not None
    answer = decode_message(payload)
    assert (answer.message.response_code, answer.mac, answer.message.terminal_id) == (
        "30", None, None)
    # the fields before the first unreadable one are still echoed
    assert (answer.message.stan, answer.message.transmission_dt) == (STAN, DT)


async def test_a_bad_field_41_itself_is_not_echoed(make_gateway: GatewayFactory) -> None:
    gw, _ = await make_gateway()
    payload = await raw_exchange(gw.port, frame(forged(fields(tid="MECH\x7f001"))))
    assert payload is not None
    answer = decode_message(payload)
    assert (answer.message.response_code, answer.mac, answer.message.terminal_id) == (
        "30", None, None)
    assert answer.message.stan == STAN


# -- the scanner -------------------------------------------------------------------------


def test_salvage_reads_past_bad_values_and_stops_where_it_must() -> None:
    assert salvage(b"02") is None and salvage(b"x200" + bytes(8)) is None
    assert salvage(b"0200") == Message(mti="0200")
    bad12 = forged(fields(**{"12": "250000"}))
    with pytest.raises(FormatError):
        decode_message(bad12)
    assert salvage(bad12) == Message(mti="0200", transmission_dt=DT, stan=STAN, terminal_id=TID)
    # a bad STAN is not echoed, but the walk goes on to 41
    assert salvage(forged(fields(**{"11": "00471A"}))) == Message(
        mti="0200", transmission_dt=DT, terminal_id=TID)
    # an LLVAR whose length prefix is not digits stops the walk at once
    raw = bytearray(_valid())
    raw[12:14] = b"1x"
    assert salvage(bytes(raw)) == Message(mti="0200")
    # truncated inside field 41 itself
    cut = _valid()[: _valid().index(TID.encode()) + 4]
    assert salvage(cut) == Message(mti="0200", transmission_dt=DT, stan=STAN)


@given(msg=messages)
def test_property_salvage_agrees_with_decode(msg: Message) -> None:
    expected = Message(mti=msg.mti, transmission_dt=msg.transmission_dt, stan=msg.stan,
                       terminal_id=msg.terminal_id)
    assert salvage(encode_message(msg, KEY)) == expected
    assert salvage(encode_message_unmac(msg)) == expected


@settings(max_examples=300)
@given(msg=messages, data=st.data())
def test_property_salvage_never_raises_and_echoes_only_valid_fields(
    msg: Message, data: st.DataObject
) -> None:
    raw = bytearray(encode_message(msg, KEY))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    with contextlib.suppress(FormatError):
        decode_message(bytes(raw))
        return
    got = salvage(bytes(raw))
    if got is not None:
        # whatever it read can be echoed: an answer carrying it encodes
        encode_message(Message(mti="0210", transmission_dt=got.transmission_dt, stan=got.stan,
                               terminal_id=got.terminal_id), KEY)
