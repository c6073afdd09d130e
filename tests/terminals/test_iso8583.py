"""The ISO 8583 profile of contract §5: round trips, bitmaps, MAC position, field helpers."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import string

import iso8583
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from terminals.iso8583 import (
    SPEC,
    AccountType,
    AmountBlock,
    FormatError,
    Message,
    Mti,
    OriginalData,
    ProcessingCode,
    ResponseCode,
    decode_message,
    encode_amounts,
    encode_message,
    encode_message_unmac,
    encode_original,
    parse_amounts,
    parse_original,
    response_mti,
)

KEY = bytes(range(32))
CARD = "6222000011112222"
TID = "POS00001"
MID = "CANTEEN00000001"
ORIG = encode_original("0200", "000001", "0315083000")
BAL = encode_amounts(
    [
        AmountBlock(account_type="00", amount=1500),
        AmountBlock(account_type="10", amount=1000),
        AmountBlock(account_type="20", amount=500),
    ]
)


def req(mti: str, **kw: object) -> Message:
    """A request with the fields every request carries."""
    base: dict[str, object] = {
        "transmission_dt": "0315083000",
        "stan": "000001",
        "local_time": "163000",
        "local_date": "0315",
        "terminal_id": TID,
        "merchant_id": MID,
    }
    return Message(mti=mti, **(base | kw))  # type: ignore[arg-type]


def resp(request: Message, code: str = "00", **kw: object) -> Message:
    return msgspec.structs.replace(
        request, mti=response_mti(request.mti), response_code=code, pin_data=None, **kw
    )


PURCHASE = req("0200", card_no=CARD, processing_code="000000", amount=1250, pin_data=b"\x01" * 8)
INQUIRY = req("0200", card_no=CARD, processing_code="310000")
ADVICE = req("0220", card_no=CARD, processing_code="000000", amount=800)
REVERSAL = req("0400", card_no=CARD, processing_code="000000", amount=1250, original_data=ORIG)
HOLD = req("0100", card_no=CARD, processing_code="000000", amount=2000)
COMPLETION = req("0220", processing_code="000000", amount=1500, original_data=ORIG)
ELECTRICITY = req("0200", card_no=CARD, processing_code="400000", amount=5000, room_id="B2-301")
METER = req("0220", processing_code="410000", amount=120, room_id="B2-301")
SIGN_ON = req("0800")

FLOWS: dict[str, Message] = {
    "sign_on": SIGN_ON,
    "sign_on_resp": resp(SIGN_ON),
    "purchase": PURCHASE,
    "purchase_resp": resp(PURCHASE, rrn="000000000042", auth_id="A1B2C3", additional_amounts=BAL),
    "purchase_declined": resp(PURCHASE, "51", rrn="000000000043"),
    "inquiry": INQUIRY,
    "inquiry_resp": resp(INQUIRY, additional_amounts=BAL),
    "advice": ADVICE,
    "advice_resp": resp(ADVICE, rrn="000000000044", additional_amounts=BAL),
    "reversal": REVERSAL,
    "reversal_resp": resp(REVERSAL, rrn="000000000045"),
    "hold": HOLD,
    "hold_resp": resp(HOLD, auth_id="000123", additional_amounts=BAL),
    "completion": COMPLETION,
    "completion_with_card": msgspec.structs.replace(COMPLETION, card_no=CARD),
    "completion_resp": resp(COMPLETION, additional_amounts=BAL),
    "electricity": ELECTRICITY,
    "electricity_resp": resp(
        ELECTRICITY,
        additional_amounts=encode_amounts(
            [AmountBlock(account_type="10", amount=0), AmountBlock(account_type="30", amount=5000)]
        ),
    ),
    "meter": METER,
    "meter_cut": resp(
        METER, "51", additional_amounts=encode_amounts([AmountBlock(account_type="30", amount=-7)])
    ),
}
HIGH_FIELDS = {"original_data", "room_id"}


def has_high_field(m: Message) -> bool:
    return any(getattr(m, name) is not None for name in HIGH_FIELDS)


def bit(raw: bytes, field: int) -> bool:
    """Whether ``field`` is flagged in the bitmaps of ``raw`` (secondary assumed present)."""
    index = 4 + (field - 1) // 8
    return bool(raw[index] & (0x80 >> ((field - 1) % 8)))


def lib_encode(doc: dict[str, str]) -> bytes:
    """Encode with the bare library and our spec: lets tests build profile violations."""
    raw, _ = iso8583.encode(doc, SPEC)
    return bytes(raw)


# -- round trips and MAC position ---------------------------------------------------------


@pytest.mark.parametrize("name", FLOWS)
def test_round_trip_every_flow(name: str) -> None:
    msg = FLOWS[name]
    raw = encode_message(msg, KEY)
    decoded = decode_message(raw)
    assert decoded.message == msg
    assert decoded.verify(KEY)
    assert not decoded.verify(bytes(32))
    assert decoded.mac == raw[-8:]
    assert decoded.mac_data == raw[:-8]
    # The MAC covers every preceding byte: recompute it by hand.
    assert raw[-8:] == hmac.new(KEY, raw[:-8], hashlib.sha256).digest()[:8]


@pytest.mark.parametrize("name", FLOWS)
def test_bitmap_and_mac_field(name: str) -> None:
    msg = FLOWS[name]
    raw = encode_message(msg, KEY)
    assert raw[:4] == msg.mti.encode()
    if has_high_field(msg):
        assert bit(raw, 1), "secondary bitmap expected"
        assert bit(raw, 128) and not bit(raw, 64)
    else:
        assert not bit(raw, 1)
        assert bit(raw, 64)


def test_secondary_bitmap_layout_for_field_90() -> None:
    raw = encode_message(Message(mti="0400", original_data=ORIG), KEY)
    assert raw[4:12] == bytes.fromhex("8000000000000000")
    assert raw[12:20] == bytes.fromhex("0000004000000001")  # 90 and 128
    assert raw[20:62] == ORIG.encode()
    assert len(raw) == 70


def test_exact_bytes_of_a_small_message() -> None:
    raw = encode_message(Message(mti="0800", stan="000007", terminal_id=TID), KEY)
    body = b"0800" + bytes.fromhex("0020000000800001") + b"000007" + TID.encode()
    assert raw == body + hmac.new(KEY, body, hashlib.sha256).digest()[:8]


def test_every_byte_is_covered_by_the_mac() -> None:
    raw = encode_message(FLOWS["purchase_resp"], KEY)
    for i in range(len(raw)):
        tampered = raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1 :]
        try:
            decoded = decode_message(tampered)
        except FormatError:
            continue
        assert not decoded.verify(KEY), f"tampering byte {i} went unnoticed"


def test_unmac_message() -> None:
    msg = Message(mti="0210", stan="000001", response_code="63", terminal_id="UNKNOWN1")
    raw = encode_message_unmac(msg)
    assert not bit(raw, 64)
    decoded = decode_message(raw)
    assert decoded.message == msg
    assert decoded.mac is None and decoded.mac_data == b""
    assert not decoded.verify(KEY)


def test_unmac_message_with_secondary_bitmap() -> None:
    raw = encode_message_unmac(Message(mti="0230", response_code="63", room_id="R1"))
    assert bit(raw, 1) and not bit(raw, 128)
    assert decode_message(raw).mac is None


def test_decode_accepts_bytearray() -> None:
    raw = encode_message(PURCHASE, KEY)
    assert decode_message(bytearray(raw)).message == PURCHASE


# -- malformed input ----------------------------------------------------------------------

GOOD = {"t": "0200", "3": "000000", "11": "000001", "41": TID}


def _bad_cases() -> dict[str, tuple[bytes, str]]:
    good = lib_encode({**GOOD, "64": "00" * 8})
    mac64_with_secondary = lib_encode({**GOOD, "64": "00" * 8, "90": ORIG, "128": "00" * 8})
    mac64_only_secondary = lib_encode({**GOOD, "64": "00" * 8, "90": ORIG})
    return {
        "empty": (b"", "truncated"),
        "short": (b"0200\x00", "truncated"),
        "letters_mti": (b"02A0" + good[4:], "MTI"),
        "non_ascii_mti": (b"\xff200" + good[4:], "MTI"),
        "version_1993": (b"1200" + good[4:], "MTI"),
        "field_outside_profile": (
            b"0200" + bytes.fromhex("0800000000000000") + b"123456",
            "field 5",
        ),
        "field_65_tertiary": (
            b"0200"
            + bytes.fromhex("8000000000000000")
            + bytes.fromhex("8000000000000000")
            + bytes(8),
            "field 65",
        ),
        "empty_secondary": (
            b"0200" + bytes.fromhex("A000000000000000") + bytes(8) + b"000000",
            "secondary",
        ),
        "truncated_secondary": (
            b"0200" + bytes.fromhex("8000000000000000") + b"\x00\x00",
            "truncated",
        ),
        "mac64_with_128": (mac64_with_secondary, "not the last"),
        "mac64_with_secondary": (mac64_only_secondary, "not the last"),
        "truncated_field": (good[:-3], "field 64"),
        "trailing_bytes": (good + b"x", "trailing bytes"),
        "missing_fields": (good[:12], "field 3"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("name", BAD)
def test_malformed_raises_format_error(name: str) -> None:
    raw, reason = BAD[name]
    with pytest.raises(FormatError) as info:
        decode_message(raw)
    assert reason in info.value.reason


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("2", "62220000A1112222"),  # letters in n
        ("2", ""),  # empty LLVAR
        ("3", "00000X"),
        ("4", "0000000012.5"),
        ("4", "-00000001250"),
        ("7", "1315083000"),  # month 13
        ("7", "0230083000"),  # Feb 30
        ("7", "0315240000"),  # hour 24
        ("11", "00 001"),
        ("12", "236000"),  # minute 60
        ("12", "235960"),  # second 60
        ("13", "0431"),  # Apr 31
        ("13", "0000"),
        ("37", "00000000004-"),  # an: no punctuation
        ("38", "A1 B2C"),  # an: no space
        ("39", "0\x00"),
        ("41", "POS\x0700001"[:8]),  # control character in ans
        ("42", "CANTEEN\x7f0000001"),
        ("54", "1002156C00000000123"),  # 19 characters
        ("54", "1002156X000000001234"),  # bad sign
        ("90", "020000000103150830000000000000000000000001"),  # pad not zeros
        ("102", ""),
    ],
)
def test_field_type_violations(field: str, value: str) -> None:
    raw = lib_encode({**GOOD, field: value, "128" if int(field) > 64 else "64": "00" * 8})
    with pytest.raises(FormatError) as info:
        decode_message(raw)
    assert f"field {field}" in info.value.reason


def test_non_ascii_field_bytes() -> None:
    raw = bytearray(lib_encode({**GOOD, "64": "00" * 8}))
    raw[raw.index(TID.encode())] = 0xC3
    with pytest.raises(FormatError):
        decode_message(bytes(raw))


def test_llvar_length_errors() -> None:
    good = lib_encode({"t": "0200", "2": CARD})
    with pytest.raises(FormatError):
        decode_message(good[:12] + b"2" + b"0" + b"1" * 20)  # 20 > 19
    with pytest.raises(FormatError):
        decode_message(good[:12] + b"1A" + CARD.encode())
    with pytest.raises(FormatError):
        decode_message(good[:12] + b"16" + CARD.encode()[:10])
    # the library reads the length with int(), which takes a sign or a space: the profile's
    # length is ASCII digits
    for prefix in (b"+9", b" 9", b"9 "):
        with pytest.raises(FormatError, match="length prefix"):
            decode_message(good[:12] + prefix + CARD.encode()[:9])


@pytest.mark.parametrize(
    "msg",
    [
        Message(mti="200"),
        Message(mti="1200"),
        Message(mti="02x0"),
        Message(mti="0200", amount=-1),
        Message(mti="0200", amount=10**12),
        Message(mti="0200", amount=True),
        Message(mti="0200", amount="100"),  # type: ignore[arg-type]
        Message(mti="0200", card_no="6222 0000"),
        Message(mti="0200", card_no="1" * 20),
        Message(mti="0200", card_no=""),
        Message(mti="0200", terminal_id="POS0001"),
        Message(mti="0200", merchant_id="M" * 16),
        Message(mti="0200", pin_data=b"\x00" * 7),
        Message(mti="0200", pin_data="00" * 8),  # type: ignore[arg-type]
        Message(mti="0200", room_id="R" * 29),
        Message(mti="0200", room_id="房间101"),
        Message(mti="0200", additional_amounts="x"),
        Message(mti="0200", original_data="1" * 42),
        Message(mti="0200", stan="\uff11" * 6),  # full-width digits are not n
    ],
)
def test_encode_rejects_invalid_messages(msg: Message) -> None:
    with pytest.raises(FormatError):
        encode_message(msg, KEY)
    with pytest.raises(FormatError):
        encode_message_unmac(msg)


# -- field 54 -----------------------------------------------------------------------------


def test_encode_amounts_layout() -> None:
    s = encode_amounts(
        [
            AmountBlock(account_type=AccountType.CASH, amount=1234),
            AmountBlock(account_type="30", amount=-5),
        ]
    )
    assert s == "1002156C0000000012343002156D000000000005"
    assert parse_amounts(s) == [
        AmountBlock(account_type="10", amount=1234),
        AmountBlock(account_type="30", amount=-5),
    ]


def test_amounts_zero_and_extremes() -> None:
    blocks = [AmountBlock(account_type="00", amount=a) for a in (0, 10**12 - 1, -(10**12 - 1))]
    s = encode_amounts(blocks)
    assert s[7] == "C" and s[27] == "C" and s[47] == "D"
    assert parse_amounts(s) == blocks
    assert parse_amounts("0002156D000000000000") == [AmountBlock(account_type="00", amount=0)]


@pytest.mark.parametrize(
    "s",
    [
        "",
        "1002156C00000000123",
        "1002156C0000000012345",
        "1002156C000000001234" * 7,
        "1002156X000000001234",
        "1A02156C000000001234",
        "1002156C00000000123 ",
        "1002156C\uff10\uff10\uff10\uff1000001234",
        "1002156c000000001234",
    ],
)
def test_parse_amounts_rejects(s: str) -> None:
    with pytest.raises(FormatError):
        parse_amounts(s)


@pytest.mark.parametrize(
    "blocks",
    [
        [],
        [AmountBlock(account_type="10", amount=1)] * 7,
        [AmountBlock(account_type="1", amount=1)],
        [AmountBlock(account_type="10", amount=1, amount_type="2")],
        [AmountBlock(account_type="10", amount=1, currency="CNY")],
        [AmountBlock(account_type="10", amount=10**12)],
        [AmountBlock(account_type="10", amount=-(10**12))],
    ],
)
def test_encode_amounts_rejects(blocks: list[AmountBlock]) -> None:
    with pytest.raises(FormatError):
        encode_amounts(blocks)


# -- field 90 -----------------------------------------------------------------------------


def test_original_data() -> None:
    s = encode_original("0200", "000123", "0315083000")
    assert s == "02000001230315083000" + "0" * 22
    assert len(s) == 42
    expected = OriginalData(mti="0200", stan="000123", transmission_dt="0315083000")
    assert parse_original(s) == expected


@pytest.mark.parametrize(
    "s",
    [
        "",
        "0200000123031508300" + "0" * 22,
        "02000001230315083000" + "0" * 21 + "1",
        "02000001230315083000" + "0" * 23,
        "0200A00123031508300" + "0" * 23,
        "\uff10200000123031508300" + "0" * 23,
    ],
)
def test_parse_original_rejects(s: str) -> None:
    with pytest.raises(FormatError):
        parse_original(s)


@pytest.mark.parametrize(
    ("mti", "stan", "dt"),
    [("200", "000001", "0315083000"), ("0200", "1", "0315083000"), ("0200", "000001", "x" * 10)],
)
def test_encode_original_rejects(mti: str, stan: str, dt: str) -> None:
    with pytest.raises(FormatError):
        encode_original(mti, stan, dt)


# -- enums --------------------------------------------------------------------------------


def test_response_codes_match_contract() -> None:
    assert {c.name: c.value for c in ResponseCode} == {
        "APPROVED": "00", "INVALID_MERCHANT": "03", "INVALID_TRANSACTION": "12",
        "INVALID_AMOUNT": "13", "INVALID_CARD": "14", "ORIGINAL_NOT_FOUND": "25",
        "FORMAT_ERROR": "30", "LOST_CARD": "41", "INSUFFICIENT_FUNDS": "51",
        "INCORRECT_PIN": "55", "EXCEEDS_DAILY_LIMIT": "61", "CARD_NOT_ACTIVE": "62",
        "MAC_FAILURE": "63", "PIN_TRIES_EXCEEDED": "75", "DUPLICATE_DIFFERENT": "94",
        "SYSTEM_ERROR": "96",
    }  # fmt: skip


def test_processing_codes_and_mtis() -> None:
    assert [p.value for p in ProcessingCode] == ["000000", "310000", "400000", "410000"]
    requests = [m for m in Mti if m.value[2] in "02"]
    assert {m.value: response_mti(m) for m in requests} == {
        "0100": "0110", "0200": "0210", "0220": "0230", "0400": "0410", "0800": "0810",
    }  # fmt: skip
    for bad in ("0210", "020", "abcd"):
        with pytest.raises(ValueError):
            response_mti(bad)


# -- property tests -----------------------------------------------------------------------


def _digits(lo: int, hi: int | None = None) -> st.SearchStrategy[str]:
    return st.text("0123456789", min_size=lo, max_size=lo if hi is None else hi)


_ans = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
_an = string.ascii_letters + string.digits
_mmdd = st.dates().map(lambda d: d.strftime("%m%d"))
_hhmmss = st.times().map(lambda t: t.strftime("%H%M%S"))
_blocks = st.lists(
    st.builds(
        AmountBlock,
        account_type=st.sampled_from(list(AccountType)).map(str),
        amount=st.integers(-(10**12 - 1), 10**12 - 1),
    ),
    min_size=1,
    max_size=6,
)

messages = st.builds(
    Message,
    mti=st.one_of(st.sampled_from([m.value for m in Mti]), _digits(3).map("0".__add__)),
    card_no=st.none() | _digits(1, 19),
    processing_code=st.none() | _digits(6),
    amount=st.none() | st.integers(0, 10**12 - 1),
    transmission_dt=st.none() | st.tuples(_mmdd, _hhmmss).map("".join),
    stan=st.none() | _digits(6),
    local_time=st.none() | _hhmmss,
    local_date=st.none() | _mmdd,
    rrn=st.none() | st.text(_an, min_size=12, max_size=12),
    auth_id=st.none() | st.text(_an, min_size=6, max_size=6),
    response_code=st.none() | st.sampled_from([c.value for c in ResponseCode]),
    terminal_id=st.none() | st.text(_ans, min_size=8, max_size=8),
    merchant_id=st.none() | st.text(_ans, min_size=15, max_size=15),
    pin_data=st.none() | st.binary(min_size=8, max_size=8),
    additional_amounts=st.none() | _blocks.map(encode_amounts),
    original_data=st.none() | st.builds(encode_original, _digits(4), _digits(6), _digits(10)),
    room_id=st.none() | st.text(_ans, min_size=1, max_size=28),
)


@given(msg=messages, key=st.binary(min_size=1, max_size=64))
def test_property_round_trip(msg: Message, key: bytes) -> None:
    raw = encode_message(msg, key)
    decoded = decode_message(raw)
    assert decoded.message == msg
    assert decoded.verify(key)
    assert bit(raw, 128 if has_high_field(msg) else 64)
    assert decode_message(encode_message_unmac(msg)).message == msg


@given(blocks=_blocks)
def test_property_amounts_round_trip(blocks: list[AmountBlock]) -> None:
    assert parse_amounts(encode_amounts(blocks)) == blocks


def _decode_or_format_error(raw: bytes) -> None:
    with contextlib.suppress(FormatError):
        decode_message(raw)


@settings(max_examples=300)
@given(raw=st.binary(max_size=200))
def test_property_arbitrary_bytes(raw: bytes) -> None:
    _decode_or_format_error(raw)


_PROFILE_FIELDS = [2, 3, 4, 7, 11, 12, 13, 37, 38, 39, 41, 42, 52, 54, 64, 90, 102, 128]


@settings(max_examples=300)
@given(
    mti=_digits(4).map(str.encode),
    fields=st.sets(st.sampled_from(_PROFILE_FIELDS)),
    tail=st.binary(max_size=200),
)
def test_property_valid_bitmaps_random_fields(mti: bytes, fields: set[int], tail: bytes) -> None:
    # Bitmaps drawn from the profile get past the header checks into the library.
    bitmap = 0
    for f in fields | ({1} if any(f > 64 for f in fields) else set()):
        bitmap |= 1 << (128 - f)
    header = bitmap.to_bytes(16, "big")
    _decode_or_format_error(mti + (header if bitmap >> 64 & (1 << 63) else header[:8]) + tail)


@settings(max_examples=300)
@given(msg=messages, data=st.data())
def test_property_mutated_messages(msg: Message, data: st.DataObject) -> None:
    raw = bytearray(encode_message(msg, KEY))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if action == "flip":
            raw[i] = data.draw(st.integers(0, 255))
        elif action == "delete":
            del raw[i]
        else:
            raw.insert(i, data.draw(st.integers(0, 255)))
    _decode_or_format_error(bytes(raw))
