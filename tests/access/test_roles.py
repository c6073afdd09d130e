"""The rights table against contract §6, written out here independently of it: a change to
engine/access/roles.py that gives a role more (or less) than the contract fails here."""

from __future__ import annotations

from engine.access.roles import (
    ADMIN_TOKEN_RIGHTS,
    KEY_ROLES,
    OPERATOR_ROLES,
    READ_TOKEN_RIGHTS,
    Right,
    Role,
    allows,
    rights_of,
)
from engine.http.auth import RULES

R = Right
# What each role may do on the JSON API (contract §6 "Role rights on §4"), route by route.
WRITES_OF: dict[str, set[tuple[str, str]]] = {
    "ledger": {("POST", "/v1/accounts"), ("POST", "/v1/transfers")},
    "campus": {("POST", "/v1/holders"), ("POST", "/v1/cards"),
               ("POST", "/v1/cards/{card_no}/report-lost"), ("POST", "/v1/cards/{card_no}/found"),
               ("POST", "/v1/cards/{card_no}/replace"), ("POST", "/v1/cards/{card_no}/close"),
               # extension: forgive a card's wrong PINs (a card action of the card office)
               ("POST", "/v1/cards/{card_no}/pin-tries/reset"),
               ("POST", "/v1/rooms"), ("POST", "/v1/subsidies"),
               ("POST", "/v1/holders/{holder_id}/activation"),
               ("POST", "/v1/rooms/{room_id}/residents"),
               ("DELETE", "/v1/rooms/{room_id}/residents/{holder_id}")},
    "terminals": {("POST", "/v1/terminals")},
}
READS = {("GET", "/v1/transfers/{transfer_id}"), ("GET", "/v1/accounts/{account_id}/balance"),
         ("GET", "/v1/accounts/{account_id}/transfers"), ("GET", "/v1/cards/{card_no}/balance")}
LOG = {("GET", "/v1/operator-log")}
CONTRACT: dict[str, set[tuple[str, str]]] = {
    "admin": WRITES_OF["ledger"] | WRITES_OF["campus"] | WRITES_OF["terminals"] | READS | LOG,
    "card_office": WRITES_OF["campus"] | READS,
    "finance": READS,
    "auditor": READS | LOG,
    "topup": {("POST", "/v1/transfers")},  # and only its own top-ups (tests/http/test_topup.py)
}


def test_roles() -> None:
    assert {str(r) for r in OPERATOR_ROLES} == {"admin", "card_office", "finance", "auditor"}
    assert set(KEY_ROLES) == {*OPERATOR_ROLES, Role.TOPUP}


def test_each_role_opens_exactly_the_contracts_routes() -> None:
    guarded = {k for k, v in RULES.items() if Right.PUBLIC not in v}
    assert guarded == set().union(*WRITES_OF.values()) | READS | LOG
    for role in Role:
        opens = {k for k in guarded if any(allows(rights_of(role), r) for r in RULES[k])}
        assert opens == CONTRACT[str(role)], role


def test_the_two_tokens_keep_their_meaning() -> None:
    guarded = {k for k, v in RULES.items() if Right.PUBLIC not in v}
    admin = {k for k in guarded if RULES[k] & ADMIN_TOKEN_RIGHTS}
    read = {k for k in guarded if RULES[k] & READ_TOKEN_RIGHTS}
    assert admin == guarded
    assert read == READS | LOG


def test_console_rights() -> None:
    # what the console (contract §8) will ask: operators and keys are the admin's alone,
    # finance reports are finance's, the auditor's and the admin's
    for right, roles in {R.OPERATORS: {Role.ADMIN}, R.API_KEYS: {Role.ADMIN},
                         R.FINANCE_REPORTS: {Role.ADMIN, Role.FINANCE, Role.AUDITOR},
                         R.OPERATOR_LOG: {Role.ADMIN, Role.AUDITOR}}.items():
        assert {r for r in Role if right in rights_of(r)} == roles, right
