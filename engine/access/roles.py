"""Roles and what each may do (contract §6), as one table.

A *right* is what a door needs (a route of the JSON API, a console page); a *role* is a set of
rights. The HTTP edge maps each route to one right (``engine/http/auth.py``); the console will
map its pages the same way. Nothing else decides who may do what.
"""

from __future__ import annotations

import enum
import functools
from typing import Final


class Role(enum.StrEnum):
    """An operator's or API key's role. ``topup`` exists only for keys."""

    ADMIN = "admin"
    CARD_OFFICE = "card_office"
    FINANCE = "finance"
    AUDITOR = "auditor"
    TOPUP = "topup"


OPERATOR_ROLES: Final = frozenset({Role.ADMIN, Role.CARD_OFFICE, Role.FINANCE, Role.AUDITOR})
KEY_ROLES: Final = frozenset(Role)


class Right(enum.StrEnum):
    """What a door asks of whoever knocks."""

    PUBLIC = "public"  # no credential at all: /healthz, /metrics, /openapi.json
    READ = "read"  # every read of contract §4 (balances, transfers, cards)
    LEDGER_WRITE = "ledger_write"  # accounts and raw transfers
    # POST /v1/transfers: LEDGER_WRITE may post anything; TOPUP only top-ups (code 4) debiting
    # the key's own clearing account, checked on the body (engine/http/auth.py)
    TOPUP = "topup"
    CAMPUS_WRITE = "campus_write"  # holders, cards, rooms, residents, activation, subsidies
    TERMINALS = "terminals"  # registering terminals
    OPERATOR_LOG = "operator_log"  # reading the operator log
    FINANCE_REPORTS = "finance_reports"  # export, reconcile, trial balance, statements
    OPERATORS = "operators"  # adding and disabling operators
    API_KEYS = "api_keys"  # creating and revoking API keys


_READS: Final = frozenset({Right.READ, Right.FINANCE_REPORTS})

RIGHTS: Final[dict[Role, frozenset[Right]]] = {
    Role.ADMIN: frozenset(Right) - {Right.TOPUP},  # LEDGER_WRITE already posts any transfer
    Role.CARD_OFFICE: frozenset({Right.READ, Right.CAMPUS_WRITE}),
    Role.FINANCE: _READS,
    Role.AUDITOR: _READS | {Right.OPERATOR_LOG},
    # a payment provider's callback: top-ups from its own clearing account, and nothing else
    # (not even reads: a provider has no business reading 40,000 students' balances)
    Role.TOPUP: frozenset({Right.TOPUP}),
}
"""Role -> rights. Every role also passes PUBLIC doors."""

# The two shared tokens keep their meaning (contract §6): everything, or every read.
ADMIN_TOKEN_RIGHTS: Final = RIGHTS[Role.ADMIN]
READ_TOKEN_RIGHTS: Final = frozenset({Right.READ, Right.FINANCE_REPORTS, Right.OPERATOR_LOG})


@functools.cache
def rights_of(role: Role) -> frozenset[Right]:
    """The rights of ``role`` (PUBLIC included)."""
    return RIGHTS[role] | {Right.PUBLIC}


def allows(rights: frozenset[Right], needed: Right) -> bool:
    """Whether a holder of ``rights`` may pass a door that needs ``needed``."""
    return needed is Right.PUBLIC or needed in rights
