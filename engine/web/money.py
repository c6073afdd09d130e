"""Money on the pages: fen shown as yuan, and yuan typed into a form read back as fen, exactly.

Shown: ``¥12.50``, ``-¥0.05`` (two decimals always, a minus before the sign of the currency);
the template macro ``money`` also puts the integer fen in ``data-fen`` (contract §7).

Typed: ASCII digits with at most two decimals (``12``, ``12.5``, ``0.05``, ``.5``); no sign, no
exponent, no grouping, no other digits than 0-9. It is read with ``Decimal`` from text that
has already been checked, so no float ever touches an amount. A wrong amount is a returned
``AmountError``, never an exception; the page says why in its language with
``render.gettext(request, AMOUNT_MESSAGES[error])``.
"""

from __future__ import annotations

import enum
import re
from decimal import Decimal
from typing import Final

from markupsafe import Markup, escape

from engine import limits
from engine.web.i18n import N_


class AmountError(enum.StrEnum):
    """Why typed yuan were refused."""

    EMPTY = "empty"
    MALFORMED = "malformed"  # not digits with an optional decimal point
    TOO_PRECISE = "too_precise"  # more than two decimals (less than a fen)
    TOO_SMALL = "too_small"  # zero where an amount must be positive
    TOO_LARGE = "too_large"  # above limits.WEB_AMOUNT_MAX_FEN


# The message of each refusal (msgids; the page translates them).
AMOUNT_MESSAGES: Final = {
    AmountError.EMPTY: N_("Enter an amount in yuan."),
    AmountError.MALFORMED: N_("Enter the amount in yuan with digits only, for example 12.50."),
    AmountError.TOO_PRECISE: N_("An amount has at most two decimals (fen)."),
    AmountError.TOO_SMALL: N_("The amount must be more than zero."),
    AmountError.TOO_LARGE: N_("The amount is too large."),
}

_YUAN: Final = re.compile(r"([0-9]*)(?:\.([0-9]*))?", re.ASCII)


def format_yuan(fen: int) -> str:
    """``1250`` -> ``¥12.50``; ``-5`` -> ``-¥0.05``."""
    if type(fen) is not int:  # a bool or a float here is a bug in the caller
        raise TypeError(f"fen must be an int, got {type(fen).__name__}")
    sign = "-" if fen < 0 else ""
    whole, part = divmod(abs(fen), 100)
    return f"{sign}¥{whole}.{part:02d}"


def money_html(fen: int, id: str | None = None) -> Markup:
    """An amount element, as the template macro ``money`` makes it, for pages that show many
    (a filter costs a fraction of a macro call): ``{{ fen | money }}``,
    ``{{ fen | money("total-available") }}``."""
    negative = " negative" if fen < 0 else ""
    element_id = f' id="{escape(id)}"' if id else ""
    # every part is an int, a fixed string or escaped
    return Markup(
        f'<span class="money{negative}"{element_id} data-fen="{fen}">{format_yuan(fen)}</span>'
    )


def plain_yuan(fen: int) -> str:
    """A non-negative amount as a form would hold it: ``1250`` -> ``12.50``."""
    if type(fen) is not int or fen < 0:
        raise ValueError(f"not a non-negative fen amount: {fen!r}")
    return f"{fen // 100}.{fen % 100:02d}"


def parse_yuan(text: str, *, allow_zero: bool = False) -> int | AmountError:
    """Typed yuan as fen, or why not. Surrounding spaces are ignored."""
    text = text.strip()
    if not text:
        return AmountError.EMPTY
    m = _YUAN.fullmatch(text) if len(text) <= limits.WEB_AMOUNT_MAX_CHARS else None
    if m is None:
        return AmountError.TOO_LARGE if _looks_like_digits(text) else AmountError.MALFORMED
    whole, decimals = m.group(1), m.group(2)
    if not whole and not decimals:  # "." alone
        return AmountError.MALFORMED
    if decimals is not None and len(decimals) > 2:
        return AmountError.TOO_PRECISE
    fen = int(Decimal(text).scaleb(2))  # exact: at most two decimals, checked above
    if fen == 0 and not allow_zero:
        return AmountError.TOO_SMALL
    if fen > limits.WEB_AMOUNT_MAX_FEN:
        return AmountError.TOO_LARGE
    return fen


def _looks_like_digits(text: str) -> bool:
    """A long run of ASCII digits (and a point) is an amount too large, not a malformed one."""
    return bool(re.fullmatch(r"[0-9]*\.?[0-9]*", text, re.ASCII))
