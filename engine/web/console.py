"""The operator console's pages (contract §8), each module one concern: the card counter
(``console_holders``), the operator log (``console_log``); more join ``console_handlers``
as they are built."""

from __future__ import annotations

from litestar.handlers import HTTPRouteHandler

from engine.web import console_holders, console_log


def console_handlers() -> list[HTTPRouteHandler]:
    """Every page of /console besides its login and logout (paths relative to /console)."""
    return [*console_holders.HANDLERS, *console_log.HANDLERS]
