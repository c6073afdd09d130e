"""The operator console's pages (contract §8), each module one concern: the card counter
(``console_holders``) and its holder search (``console_search``), the operator log
(``console_log``), the day's finance (``console_finance``), the subsidy month
(``console_subsidies``) and the operators (``console_operators``)."""

from __future__ import annotations

from litestar.handlers import HTTPRouteHandler

from engine.web import (
    console_finance,
    console_holders,
    console_log,
    console_operators,
    console_search,
    console_subsidies,
)


def console_handlers() -> list[HTTPRouteHandler]:
    """Every page of /console besides its login and logout (paths relative to /console)."""
    return [
        *console_holders.HANDLERS,
        *console_search.HANDLERS,
        *console_log.HANDLERS,
        *console_finance.HANDLERS,
        *console_subsidies.HANDLERS,
        *console_operators.HANDLERS,
    ]
