"""Pages: Jinja2 templates rendered into Litestar responses, in the request's language, with the
security headers every page carries.

Plain Jinja2, not Litestar's template integration: that holds one template engine for the
app, while each language here has its own environment (gettext installed once per language,
so rendering is thread- and task-safe with no per-request translation switching); error pages
are rendered from the app's synchronous exception handlers, outside any route; and it keeps
the headers and cookies of every answer in this one module, with no template config in
``create_app``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any, Final
from urllib.parse import urlencode

import jinja2
import jinja2.ext
import jinja2.lexer
from babel.support import Translations
from litestar import Request, Response
from litestar.datastructures import Cookie
from markupsafe import Markup

from engine import limits
from engine.web import i18n
from engine.web.i18n import Lang
from engine.web.money import format_yuan, money_html
from engine.web.portal import Portal, portal_of_path
from engine.web.state import web_state
from engine.web.static import stylesheet_url

HTML: Final = "text/html"  # Litestar adds "; charset=utf-8" to text types
# No script runs on these pages (none is needed), styles come only from this origin's
# /static (the only path serving text/css; with nosniff a browser refuses anything else as a
# stylesheet), no inline style, no framing, forms post only here.
CSP: Final = (
    "default-src 'self'; script-src 'none'; style-src 'self'; img-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
# Every page is someone's own (balances, statements, a form token bound to their cookie): no
# cache, the browser's back-forward cache included, may keep one.
NO_STORE: Final = "no-store"

_COOKIES: Final = "web_cookies"  # request.state: cookies to set on the answer
_LANG: Final = "web_lang"  # request.state: the negotiated language
CSRF_TOKEN: Final = "web_csrf"  # request.state: the token this request's forms carry


class ConstantGettext(jinja2.ext.Extension):
    """Translates ``{{ _("a literal") }}`` once, when a template is compiled, instead of at
    every render: each language has its own environment (and so its own compiled templates),
    and a page has a few dozen such strings. The text is what the i18n extension's newstyle
    gettext renders for it (the translation, marked safe, ``%`` applied with no variables);
    a call with variables, or of a non-literal, is left to it."""

    _CALL: Final = ("variable_begin", "name", "lparen", "string", "rparen", "variable_end")

    def filter_stream(self, stream: jinja2.lexer.TokenStream) -> Iterator[jinja2.lexer.Token]:
        translations = self.environment.globals["onecard_translations"]
        assert isinstance(translations, Translations)
        window: list[jinja2.lexer.Token] = []
        for token in stream:
            window.append(token)
            if len(window) > len(self._CALL):
                yield window.pop(0)
            if len(window) == len(self._CALL) and self._folds(window):
                text = Markup(translations.gettext(window[3].value)) % {}
                yield jinja2.lexer.Token(window[0].lineno, "data", str(text))
                window = []
        yield from window

    def _folds(self, window: list[jinja2.lexer.Token]) -> bool:
        return (tuple(t.type for t in window) == self._CALL and window[1].value == "_"
                and isinstance(window[3].value, str))


@functools.cache
def environment(lang: Lang) -> jinja2.Environment:
    """The template environment of one language (made once)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("engine.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        extensions=["jinja2.ext.i18n", ConstantGettext],
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,  # package data: never changes under a running process (no stat)
    )
    env.policies["ext.i18n.trimmed"] = True  # must match babel.cfg's trimmed = true
    env.install_gettext_translations(i18n.translations(lang), newstyle=True)  # type: ignore[attr-defined]
    env.globals["onecard_translations"] = i18n.translations(lang)  # for ConstantGettext
    env.filters["yuan"] = format_yuan
    env.filters["money"] = money_html
    env.globals["css_url"] = stylesheet_url()
    return env


def request_lang(request: Request[Any, Any, Any]) -> Lang:
    """The request's language (once per request); ``?lang=`` is remembered in a cookie."""
    state = request.state
    found = state.get(_LANG)
    if isinstance(found, Lang):
        return found
    try:
        query = request.query_params.get(i18n.LANG_PARAM)
    except Exception:  # a query string the framework cannot parse chooses no language
        query = None
    lang, remember = i18n.negotiate(
        query=query,
        cookie=request.cookies.get(i18n.LANG_COOKIE),
        accept_language=request.headers.get("accept-language"),
    )
    state[_LANG] = lang
    if remember:
        max_age = limits.WEB_LANG_COOKIE_MAX_AGE_S
        queue_cookie(request, i18n.LANG_COOKIE, lang.value, path="/", max_age=max_age)
    return lang


def gettext(request: Request[Any, Any, Any], message: str) -> str:
    """``message`` in the request's language (for text made outside a template)."""
    return i18n.translations(request_lang(request)).gettext(message)


def queue_cookie(
    request: Request[Any, Any, Any], key: str, value: str, *, path: str, max_age: int | None
) -> None:
    """A cookie to set on this request's answer: HttpOnly, SameSite=Lax, Secure by setting.
    ``max_age`` None lasts the browser session; 0 deletes the cookie."""
    secure = web_state(request.app).cookie_secure
    cookie = Cookie(
        key=key, value=value, path=path, max_age=max_age, httponly=True, samesite="lax",
        secure=secure,
    )
    request.state.setdefault(_COOKIES, []).append(cookie)


def finish(request: Request[Any, Any, Any], response: Response[Any]) -> Response[Any]:
    """Security headers (and no-store unless the answer says otherwise) and the queued
    cookies, on any answer of the web pages."""
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    response.headers.setdefault("Cache-Control", NO_STORE)
    for cookie in request.state.pop(_COOKIES, []):
        response.set_cookie(cookie)
    return response


def lang_urls(request: Request[Any, Any, Any]) -> dict[str, str]:
    """This page in each language (its other query parameters kept)."""
    try:
        kept = [(k, v) for k, v in request.query_params.multi_items() if k != i18n.LANG_PARAM]
    except Exception:
        kept = []
    path = request.url.path
    return {
        lang.value: f"{path}?{urlencode([*kept, (i18n.LANG_PARAM, lang.value)])}" for lang in Lang
    }


def render(request: Request[Any, Any, Any], template: str, context: Mapping[str, Any]) -> str:
    """A template in the request's language, with what every page uses."""
    lang = request_lang(request)
    portal: Portal | None = portal_of_path(request.url.path)
    common = {
        "lang": lang.value,
        "csrf": request.state.get(CSRF_TOKEN, ""),
        "lang_urls": lang_urls(request),
        "portal": portal,
        "home_url": portal.home if portal else "/self",
    }
    return environment(lang).get_template(template).render({**common, **context})


def page(
    request: Request[Any, Any, Any], template: str, *, status: int = 200, **context: Any
) -> Response[bytes]:
    """A page answer."""
    body = render(request, template, context).encode()
    return finish(request, Response(body, status_code=status, media_type=HTML))


def redirect(request: Request[Any, Any, Any], location: str) -> Response[bytes]:
    """303 See Other to a path of this site (after a form, or to the login)."""
    response = Response(b"", status_code=303, media_type=HTML, headers={"Location": location})
    return finish(request, response)
