"""Every answer of the web pages: security headers, error pages in the page's language, the
stylesheet, and bad input that is never a 500."""

from __future__ import annotations

import re

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st
from litestar import Litestar
from litestar.handlers import HTTPRouteHandler

from engine import limits
from engine.web.portal import CONSOLE, SELF, Portal, is_web_path
from engine.web.static import STYLESHEET_PATH, stylesheet_url
from tests.web.conftest import PORTALS, WebServer, csrf_of, html_lang, log_in, new_user, parse

SECURITY = {
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def _assert_secure(r: httpx.Response) -> None:
    where = f"{r.request.method} {r.request.url.path} -> {r.status_code}"
    for name, value in SECURITY.items():
        assert r.headers.get(name) == value, f"{where}: {name}"
    csp = r.headers.get("content-security-policy", "")
    directives = dict(d.strip().partition(" ")[::2] for d in csp.split(";"))
    assert directives.get("default-src") == "'self'", where
    assert directives.get("script-src") == "'none'", where
    assert directives.get("style-src") == "'self'", where
    assert directives.get("frame-ancestors") == "'none'", where
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, where


def _web_get_paths(app: Litestar) -> list[str]:
    paths = []
    for route in app.routes:
        if not is_web_path(route.path) or "_test" in route.path:
            continue
        for handler in route.route_handlers:  # type: ignore[union-attr]
            if isinstance(handler, HTTPRouteHandler) and "GET" in handler.http_methods:
                paths.append(route.path)
    return sorted(set(paths))


async def test_every_page_carries_the_security_headers(
    client: httpx.AsyncClient, web: WebServer
) -> None:
    pages = [p for p in _web_get_paths(web.app) if p != STYLESHEET_PATH]
    assert {"/self", "/self/login", "/console", "/console/login"} <= set(pages)
    answers = [await client.get(p) for p in pages]  # logged out: forms and redirects
    for portal in (SELF, CONSOLE):
        await log_in(client, portal, new_user(web), "correct horse 1")
    answers += [await client.get(p) for p in pages]  # logged in
    answers += [
        await client.get("/self/nowhere"),
        await client.get("/console/a/b/c?lang=en"),
        await client.put(SELF.login),  # 405
        await client.post("/self/_test/bump"),  # 403
        await client.get("/self/_test/boom"),  # 500
        await client.get("/self/_test/db-away"),  # 503
        await client.post(SELF.login, data={"csrf": "x"}),  # 403 on a public form
        await client.post("/self/logout", data={"csrf": csrf_of((await client.get("/self")).text)}),
    ]
    statuses = {r.status_code for r in answers}
    assert {200, 303, 403, 404, 405, 500, 503} <= statuses
    for r in answers:
        _assert_secure(r)
        if r.status_code != 303:
            assert r.headers["content-type"] == "text/html; charset=utf-8"


@PORTALS
async def test_not_found_is_a_page_in_the_page_language(
    client: httpx.AsyncClient, portal: Portal
) -> None:
    prefix = portal.prefix
    zh = await client.get(f"{prefix}/no/such/page")
    assert zh.status_code == 404 and html_lang(zh.text) == "zh-CN"
    assert parse(zh.text).ids["error-page"]["data-status"] == "404"
    assert "页面不存在" in zh.text
    en = await client.get(f"{prefix}/no/such/page", headers={"Accept-Language": "en"})
    assert en.status_code == 404 and html_lang(en.text) == "en" and "Page not found" in en.text


async def test_the_api_keeps_its_json_errors(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/transfers/not-a-uuid", headers={"Authorization": "Bearer x"})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    r = await client.get("/v1/no/such/thing")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = await client.get("/selfish")  # not under /self
    assert r.status_code == 404 and r.json()["error"] == "not_found"


async def test_a_bug_is_a_500_page_that_tells_nothing(client: httpx.AsyncClient) -> None:
    r = await client.get("/self/_test/boom", params={"lang": "en"})
    assert r.status_code == 500 and html_lang(r.text) == "en"
    assert "Something went wrong" in r.text
    assert "secret" not in r.text and "RuntimeError" not in r.text


async def test_a_lost_database_is_a_503_page_with_retry_after(client: httpx.AsyncClient) -> None:
    r = await client.get("/self/_test/db-away")
    assert r.status_code == 503 and r.headers["retry-after"] == str(limits.RETRY_AFTER_S)
    assert "系统繁忙" in r.text and "secret" not in r.text


async def test_405_says_which_methods(client: httpx.AsyncClient) -> None:
    r = await client.delete(SELF.login)
    assert r.status_code == 405 and "GET" in r.headers["allow"] and "POST" in r.headers["allow"]


# -- the stylesheet --------------------------------------------------------------------------------


async def test_the_stylesheet_is_cacheable(client: httpx.AsyncClient) -> None:
    page = await client.get(SELF.login)
    link = re.search(r'<link rel="stylesheet" href="([^"]+)">', page.text)
    assert link and link.group(1) == stylesheet_url()
    r = await client.get(link.group(1))
    assert r.status_code == 200 and r.headers["content-type"] == "text/css; charset=utf-8"
    assert r.headers["cache-control"] == f"public, max-age={limits.WEB_STATIC_MAX_AGE_S}"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "max-width" in r.text
    # nothing from anywhere else, nothing that runs
    assert "@import" not in r.text and "url(" not in r.text and "expression(" not in r.text
    again = await client.get(STYLESHEET_PATH, headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert r.headers["etag"].strip('"') in link.group(1)


def test_templates_hold_no_script_and_no_inline_style() -> None:
    from pathlib import Path

    import engine.web

    for path in (Path(engine.web.__file__).parent / "templates").glob("*.html"):
        text = path.read_text(encoding="utf-8").lower()
        assert "<script" not in text and "style=" not in text and "<style" not in text, path
        assert not re.search(r"\son[a-z]+\s*=", text), f"{path}: an inline event handler"


# -- bad input is never a 500 --------------------------------------------------------------------

_FIELD = st.one_of(
    st.text(max_size=300),
    st.sampled_from(
        ["", "\x00", "a" * 10_000, "\uff11\uff12", "' OR 1=1 --", "<script>", "\udcff"]
    ),
)


def _encoded(value: object) -> object:
    if isinstance(value, list):
        return [_encoded(v) for v in value]
    return str(value).encode("utf-8", "replace")


@settings(max_examples=60, deadline=None)
@given(
    fields=st.dictionaries(
        st.sampled_from(["holder_id", "password", "csrf", "username", "x"]),
        st.one_of(_FIELD, st.lists(_FIELD, max_size=3)),
        max_size=5,
    ),
    with_token=st.booleans(),
)
def test_any_login_form_is_answered_never_a_500(
    web: WebServer, fields: dict[str, object], with_token: bool
) -> None:
    with httpx.Client(base_url=web.base_url, timeout=30) as c:
        token = csrf_of(c.get(SELF.login).text)
        data = dict(fields)
        if with_token:
            data["csrf"] = token
        # surrogates cannot travel as UTF-8: they arrive as "?"
        data = {k: _encoded(v) for k, v in data.items()}
        r = c.post(SELF.login, data=data)  # type: ignore[arg-type]
        assert r.status_code in (200, 303, 400, 403), r.text
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        if r.status_code == 303:
            assert r.headers["location"] == SELF.home


@settings(max_examples=40, deadline=None)
@given(
    st.binary(max_size=2000),
    st.sampled_from(
        [
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=b",
            "multipart/form-data",
            "text/plain",
            "",
        ]
    ),
)
def test_any_body_is_answered_never_a_500(web: WebServer, body: bytes, content_type: str) -> None:
    with httpx.Client(base_url=web.base_url, timeout=30) as c:
        c.get(SELF.login)
        for path in (SELF.login, "/self/logout", "/self/_test/bump", "/console/login"):
            r = c.post(path, content=body, headers={"Content-Type": content_type})
            assert r.status_code in (303, 400, 403), (path, r.status_code, r.text)
