"""The languages of the web pages: Chinese (zh-CN) first, English second, by gettext catalogs.

The ``.po`` files under ``locale/`` are the source and the only thing in the repository; each
process compiles them in memory once (babel's ``pofile`` and ``mofile``), so a clean clone runs
without a build step and no compiled ``.mo`` can go stale. Messages are written in English in
the code and templates (the msgids); ``pybabel`` keeps the catalogs in step with them (see
``tests/web/test_i18n.py``).

Which language a page speaks: ``?lang=en|zh-CN`` (then remembered in a cookie), else that
cookie, else an ``Accept-Language`` that prefers English to Chinese, else Chinese.
"""

from __future__ import annotations

import enum
import functools
import io
import re
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Final

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import Translations

DOMAIN: Final = "onecard"
LANG_COOKIE: Final = "onecard_lang"
LANG_PARAM: Final = "lang"


def N_(message: str) -> str:
    """Marks a message for the catalogs (extracted by pybabel); it is translated where shown."""
    return message


class Lang(enum.StrEnum):
    """A language of the pages, spelled as ``<html lang>`` and ``?lang=`` spell it."""

    ZH = "zh-CN"
    EN = "en"


DEFAULT_LANG: Final = Lang.ZH
# gettext's directory names (a locale identifier, underscore) for each language
_LOCALE_DIRS: Final = {Lang.ZH: "zh_CN", Lang.EN: "en"}


def catalog_file(lang: Lang) -> Traversable:
    """The ``.po`` catalog of ``lang`` (package data)."""
    root = resources.files("engine.web") / "locale" / _LOCALE_DIRS[lang] / "LC_MESSAGES"
    return root / f"{DOMAIN}.po"


@functools.cache
def translations(lang: Lang) -> Translations:
    """The compiled catalog of ``lang``, made once per process from its ``.po`` file.

    A malformed catalog fails here, at the first page, not as a half-translated page later;
    fuzzy entries are left out (a guess is not a translation).
    """
    with catalog_file(lang).open("rb") as f:
        catalog = read_po(f, locale=_LOCALE_DIRS[lang], domain=DOMAIN, abort_invalid=True)
    compiled = io.BytesIO()
    write_mo(compiled, catalog, use_fuzzy=False)
    compiled.seek(0)
    return Translations(compiled, domain=DOMAIN)


def parse_lang(value: str | None) -> Lang | None:
    """``en`` or ``zh-CN`` (any case, ``_`` for ``-``), else None."""
    if not value:
        return None
    wanted = value.strip().replace("_", "-").lower()
    return next((lang for lang in Lang if lang.value.lower() == wanted), None)


# One item of Accept-Language: a language range, then an optional weight (RFC 9110 §12.4.2).
_ITEM: Final = re.compile(
    r"\s*([A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*|\*)\s*(?:;\s*q\s*=\s*(0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?))?\s*",
    re.ASCII,
)
# Only this many items are looked at: a header is a short list, not a place to spend CPU.
_MAX_ITEMS: Final = 32


def prefers_english(accept_language: str | None) -> bool:
    """True when the header ranks some English above every Chinese (a tie goes to the one
    listed first); malformed items are skipped, never an error."""
    if not accept_language:
        return False
    best: dict[str, tuple[float, int]] = {}
    for position, item in enumerate(accept_language.split(",")[:_MAX_ITEMS]):
        m = _ITEM.fullmatch(item)
        if m is None:
            continue
        primary = m.group(1).split("-")[0].lower()
        weight = float(m.group(2)) if m.group(2) is not None else 1.0
        if primary in ("en", "zh") and weight > 0:
            rank = (weight, -position)
            best[primary] = max(best.get(primary, rank), rank)
    english, chinese = best.get("en"), best.get("zh")
    return english is not None and (chinese is None or english > chinese)


def negotiate(
    *, query: str | None, cookie: str | None, accept_language: str | None
) -> tuple[Lang, bool]:
    """The page's language, and whether the browser should remember it (it came from ``?lang``)."""
    chosen = parse_lang(query)
    if chosen is not None:
        return chosen, True
    remembered = parse_lang(cookie)
    if remembered is not None:
        return remembered, False
    return (Lang.EN if prefers_english(accept_language) else DEFAULT_LANG), False
