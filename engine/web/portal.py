"""The two doors of the web pages: /self for card holders, /console for operators.

Both share everything (templates, sessions, form tokens, languages, error pages); a portal
says only what differs: its path, its cookies, the name of the login id field and its titles.
"""

from __future__ import annotations

from typing import Final

import msgspec

from engine.web.i18n import N_
from engine.web.sessions import SessionKind


class Portal(msgspec.Struct, frozen=True):
    """One door of the web pages."""

    kind: SessionKind
    prefix: str  # every page of the portal is under it
    title: str  # msgid
    cookie: str  # the session cookie (Path = prefix)
    pre_cookie: str  # the pre-session cookie of pages shown before a login (Path = prefix)
    subject_field: str  # the login form's id field (contract §7 / §8)
    subject_label: str  # msgid
    wrong_login: str  # msgid: the #error text of a wrong id or password

    @property
    def home(self) -> str:
        """The page a login lands on."""
        return self.prefix

    @property
    def login(self) -> str:
        """The login form."""
        return f"{self.prefix}/login"


SELF: Final = Portal(
    kind=SessionKind.SELF,
    prefix="/self",
    title=N_("Campus card self-service"),
    cookie="onecard_self",
    pre_cookie="onecard_self_pre",
    subject_field="holder_id",
    subject_label=N_("Card holder id"),
    wrong_login=N_("Wrong card holder id or password."),
)
CONSOLE: Final = Portal(
    kind=SessionKind.CONSOLE,
    prefix="/console",
    title=N_("Card office console"),
    cookie="onecard_console",
    pre_cookie="onecard_console_pre",
    subject_field="username",
    subject_label=N_("Username"),
    wrong_login=N_("Wrong username or password."),
)
PORTALS: Final = (SELF, CONSOLE)
# Static files are shared; their answers get the same security headers as the pages.
STATIC_PREFIX: Final = "/static"


def portal_of_path(path: str) -> Portal | None:
    """The portal a request path belongs to."""
    for portal in PORTALS:
        if path == portal.prefix or path.startswith(portal.prefix + "/"):
            return portal
    return None


def is_web_path(path: str) -> bool:
    """A path whose answers are pages (HTML errors), not the JSON API's."""
    return portal_of_path(path) is not None or path.startswith(STATIC_PREFIX + "/")
