"""Languages: complete, up-to-date catalogs, and the rule that picks a page's language."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.pofile import read_po
from hypothesis import given
from hypothesis import strategies as st

from engine.web import i18n
from engine.web.i18n import LANG_COOKIE, Lang, negotiate, prefers_english
from engine.web.portal import CONSOLE, SELF, Portal
from tests.web.conftest import PORTALS, html_lang, parse

WEB = Path(i18n.__file__).parent
UPDATE = "update them as engine/web/babel.cfg says (pybabel extract, then pybabel update)"


def _catalog(lang: Lang) -> Catalog:
    with i18n.catalog_file(lang).open("rb") as f:
        return read_po(f)


def _messages(catalog: Catalog) -> Iterator[tuple[str, tuple[str, ...]]]:
    for m in catalog:
        if not m.id:
            continue  # the header
        msgid = m.id[0] if isinstance(m.id, (tuple, list)) else m.id
        strings = tuple(m.string) if isinstance(m.string, (tuple, list)) else (m.string,)
        yield msgid, strings


def _extracted() -> set[str]:
    with (WEB / "babel.cfg").open(encoding="utf-8") as f:
        method_map, options_map = parse_mapping_cfg(f)
    found = set()
    for _file, _line, message, _comments, _context in extract_from_dir(
        str(WEB), method_map, options_map
    ):
        found.add(message[0] if isinstance(message, tuple) else message)
    return found


@pytest.mark.parametrize("lang", list(Lang))
def test_every_message_is_translated(lang: Lang) -> None:
    catalog = _catalog(lang)
    assert not [m.id for m in catalog if m.id and m.fuzzy], "fuzzy entries are not translations"
    empty = [msgid for msgid, strings in _messages(catalog) if not all(s.strip() for s in strings)]
    assert empty == []
    errors = [(m.id, [str(e) for e in errs]) for m, errs in catalog.check()]
    assert errors == []  # e.g. a %(name)s placeholder lost in translation
    assert catalog.obsolete == {}


def test_the_chinese_catalog_is_chinese() -> None:
    untranslated = [
        msgid
        for msgid, strings in _messages(_catalog(Lang.ZH))
        if not any("\u4e00" <= ch <= "\u9fff" for s in strings for ch in s)
    ]
    assert untranslated == []


@pytest.mark.parametrize("lang", list(Lang))
def test_the_catalogs_match_the_code_and_templates(lang: Lang) -> None:
    in_code = _extracted()
    assert "Log in" in in_code and "Enter an amount in yuan." in in_code  # both kinds found
    in_catalog = {msgid for msgid, _ in _messages(_catalog(lang))}
    assert sorted(in_code - in_catalog) == [], f"missing from the {lang} catalog: {UPDATE}"
    assert sorted(in_catalog - in_code) == [], f"no longer used, in the {lang} catalog: {UPDATE}"


def test_the_catalogs_compile_at_start() -> None:
    assert i18n.translations(Lang.ZH).gettext("Log in") == "登录"
    assert i18n.translations(Lang.EN).gettext("Log in") == "Log in"
    minutes = "Too many failed attempts. This id is locked; try again in %(num)d minute."
    plural = minutes.replace("minute.", "minutes.")
    assert i18n.translations(Lang.EN).ngettext(minutes, plural, 2) == plural
    assert "分钟" in i18n.translations(Lang.ZH).ngettext(minutes, plural, 2)


# -- choosing the language ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "english"),
    [
        (None, False),
        ("", False),
        ("en", True),
        ("en-US,en;q=0.9", True),
        ("en-GB, zh-CN;q=0.8", True),
        ("zh-CN,zh;q=0.9,en;q=0.8", False),
        ("zh-TW", False),
        ("fr-FR, en;q=0.5", True),  # English before any Chinese
        ("fr-FR", False),  # neither: Chinese, the default
        ("en;q=0.5, zh;q=0.6", False),
        ("zh;q=0.5, en;q=0.6", True),
        ("en, zh", True),  # a tie: the one listed first
        ("zh, en", False),
        ("en;q=0", False),  # "not English"
        ("*", False),
        ("en;q=2", False),  # malformed weight: the item is skipped
        ("EN-us", True),
        ("en;q=0.001", True),
        ("zh;q=0.000, en;q=0.001", True),
        (",,,;;;q=", False),
    ],
)
def test_accept_language(header: str | None, english: bool) -> None:
    assert prefers_english(header) is english


@given(st.text(max_size=200))
def test_any_accept_language_is_read_without_error(header: str) -> None:
    assert prefers_english(header) in (True, False)


@pytest.mark.parametrize(
    ("query", "cookie", "accept", "expected"),
    [
        ("en", None, None, (Lang.EN, True)),
        ("zh-CN", "en", "en", (Lang.ZH, True)),
        ("zh_cn", None, None, (Lang.ZH, True)),
        ("EN", None, None, (Lang.EN, True)),
        ("fr", "en", None, (Lang.EN, False)),  # an unknown ?lang is ignored
        (None, "en", "zh-CN", (Lang.EN, False)),  # the cookie before the header
        (None, "xx", "en", (Lang.EN, False)),
        (None, None, "en", (Lang.EN, False)),
        (None, None, None, (Lang.ZH, False)),
    ],
)
def test_negotiate(
    query: str | None, cookie: str | None, accept: str | None, expected: tuple[Lang, bool]
) -> None:
    assert negotiate(query=query, cookie=cookie, accept_language=accept) == expected


# -- over HTTP ----------------------------------------------------------------------------------


@PORTALS
async def test_chinese_by_default(client: httpx.AsyncClient, portal: Portal) -> None:
    r = await client.get(portal.login)
    assert r.status_code == 200
    assert html_lang(r.text) == "zh-CN"
    assert "登录" in r.text and "Log in" not in r.text
    assert LANG_COOKIE not in r.cookies


async def test_lang_en_is_remembered_in_a_cookie(client: httpx.AsyncClient) -> None:
    r = await client.get(SELF.login, params={"lang": "en"})
    assert html_lang(r.text) == "en"
    assert "Log in" in r.text and "登录" not in r.text
    cookie = r.headers["set-cookie"]
    header = next(h for h in r.headers.get_list("set-cookie") if h.startswith(LANG_COOKIE + "="))
    assert header.startswith(f"{LANG_COOKIE}=en;"), cookie
    attributes = {a.strip().split("=")[0].lower() for a in header.split(";")[1:]}
    assert {"httponly", "path", "samesite", "max-age"} <= attributes
    assert "Path=/;" in header + ";" and "SameSite=lax" in header
    # the next page, on the other portal too, without ?lang, is English
    for path in (SELF.login, CONSOLE.login, "/self/nowhere"):
        assert html_lang((await client.get(path)).text) == "en"
    back = await client.get(CONSOLE.login, params={"lang": "zh-CN"})
    assert html_lang(back.text) == "zh-CN"
    assert html_lang((await client.get(SELF.login)).text) == "zh-CN"


async def test_accept_language_preferring_english(client: httpx.AsyncClient) -> None:
    english = await client.get(SELF.login, headers={"Accept-Language": "en-US,en;q=0.9,zh;q=0.8"})
    assert html_lang(english.text) == "en"
    assert LANG_COOKIE not in english.cookies  # only ?lang is remembered
    chinese = await client.get(SELF.login, headers={"Accept-Language": "zh-CN,en;q=0.9"})
    assert html_lang(chinese.text) == "zh-CN"
    other = await client.get(SELF.login, headers={"Accept-Language": "fr"})
    assert html_lang(other.text) == "zh-CN"


async def test_the_language_link_keeps_the_page_and_its_query(client: httpx.AsyncClient) -> None:
    r = await client.get("/self/login", params={"before": "123", "lang": "zh-CN"})
    link = parse(r.text).ids["lang-switch"]
    assert link["href"] == "/self/login?before=123&lang=en"
    assert link["lang"] == "en" and link["hreflang"] == "en"
