"""Money on the pages: fen shown as yuan with data-fen, typed yuan read back exactly."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from engine import limits
from engine.web.i18n import Lang
from engine.web.money import AMOUNT_MESSAGES, AmountError, format_yuan, parse_yuan, plain_yuan
from engine.web.render import environment

IN_BOUNDS = st.integers(min_value=1, max_value=limits.WEB_AMOUNT_MAX_FEN)


def test_format_yuan() -> None:
    assert format_yuan(1250) == "¥12.50"
    assert format_yuan(5) == "¥0.05"
    assert format_yuan(0) == "¥0.00"
    assert format_yuan(-1250) == "-¥12.50"
    assert format_yuan(-5) == "-¥0.05"
    assert format_yuan(123456789) == "¥1234567.89"


@pytest.mark.parametrize("wrong", [True, 1.5, "12"])
def test_format_refuses_what_is_not_fen(wrong: object) -> None:
    with pytest.raises(TypeError):
        format_yuan(wrong)  # type: ignore[arg-type]


def _macro(fen: int, **kw: object) -> str:
    template = environment(Lang.ZH).from_string(
        '{% from "macros.html" import money %}{{ money(fen, **kw) }}'
    )
    return template.render(fen=fen, kw=kw)


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_the_money_macro_carries_signed_fen(fen: int) -> None:
    html = _macro(fen)
    m = re.fullmatch(
        r'<span class="money( negative)?" data-fen="(-?\d+)">(-?)¥(\d+)\.(\d\d)</span>', html
    )
    assert m, html
    assert int(m.group(2)) == fen
    assert (m.group(1) is not None) == (fen < 0) == (m.group(3) == "-")
    shown = int(m.group(4)) * 100 + int(m.group(5))
    assert shown == abs(fen)


def test_the_money_macro_takes_an_id() -> None:
    assert _macro(-250, id="total-available") == (
        '<span class="money negative" id="total-available" data-fen="-250">-¥2.50</span>'
    )


@given(IN_BOUNDS)
@example(1)
@example(limits.WEB_AMOUNT_MAX_FEN)
def test_every_fen_in_bounds_round_trips(fen: int) -> None:
    text = plain_yuan(fen)
    assert parse_yuan(text) == fen
    # the same amount typed the other ways people type it
    whole, part = divmod(fen, 100)
    if part % 10 == 0:
        assert parse_yuan(f"{whole}.{part // 10}") == fen
    if part == 0:
        assert parse_yuan(str(whole)) == fen
        assert parse_yuan(f"{whole}.") == fen
    assert parse_yuan(f"  {text}\t") == fen
    if whole == 0:
        assert parse_yuan(text[1:]) == fen  # ".05"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12.50", 1250),
        ("0.01", 1),
        ("007.5", 750),
        (".5", 50),
        ("0", AmountError.TOO_SMALL),
        ("0.00", AmountError.TOO_SMALL),
        ("", AmountError.EMPTY),
        ("   ", AmountError.EMPTY),
        (".", AmountError.MALFORMED),
        ("12.345", AmountError.TOO_PRECISE),
        ("0.001", AmountError.TOO_PRECISE),
        ("12.500", AmountError.TOO_PRECISE),
        ("-1", AmountError.MALFORMED),
        ("+1", AmountError.MALFORMED),
        ("-0.00", AmountError.MALFORMED),
        ("1e3", AmountError.MALFORMED),
        ("1E-2", AmountError.MALFORMED),
        ("1_000", AmountError.MALFORMED),
        ("1,000.00", AmountError.MALFORMED),
        ("1 000", AmountError.MALFORMED),
        ("NaN", AmountError.MALFORMED),
        ("Infinity", AmountError.MALFORMED),
        ("0x10", AmountError.MALFORMED),
        ("¥12", AmountError.MALFORMED),
        ("\uff11\uff12", AmountError.MALFORMED),  # fullwidth digits
        ("١٢", AmountError.MALFORMED),  # Arabic-Indic digits
        ("12.\uff15", AmountError.MALFORMED),
        ("1.2.3", AmountError.MALFORMED),
        ("12\n", 1200),  # the newline is surrounding space
        ("1\n2", AmountError.MALFORMED),
        ("1000000.00", limits.WEB_AMOUNT_MAX_FEN),
        ("1000000.01", AmountError.TOO_LARGE),
        ("9" * 15, AmountError.TOO_LARGE),
        ("9" * 5000, AmountError.TOO_LARGE),
    ],
)
def test_parse_yuan(text: str, expected: int | AmountError) -> None:
    assert parse_yuan(text) == expected


def test_zero_where_allowed() -> None:
    assert parse_yuan("0", allow_zero=True) == 0
    assert parse_yuan("0.00", allow_zero=True) == 0


@given(st.text(max_size=40))
def test_any_text_is_an_amount_or_a_reason_never_an_error(text: str) -> None:
    result = parse_yuan(text)
    if isinstance(result, AmountError):
        assert result in AMOUNT_MESSAGES
        return
    assert type(result) is int
    assert 0 < result <= limits.WEB_AMOUNT_MAX_FEN
    assert re.fullmatch(r"[0-9]*(\.[0-9]{0,2})?", text.strip())


@given(st.decimals(places=3, min_value=-(10**7), max_value=10**7))
def test_three_decimals_are_refused_unless_the_last_is_zero(value: object) -> None:
    text = f"{value:f}"
    result = parse_yuan(text)
    if text.startswith("-"):
        assert result == AmountError.MALFORMED
    elif len(text.partition(".")[2]) > 2:
        assert result == AmountError.TOO_PRECISE


def test_every_refusal_reads_in_both_languages() -> None:
    for error, msgid in AMOUNT_MESSAGES.items():
        zh = environment(Lang.ZH).from_string("{{ _(m) }}").render(m=msgid)
        en = environment(Lang.EN).from_string("{{ _(m) }}").render(m=msgid)
        assert zh and en and zh != en, error
