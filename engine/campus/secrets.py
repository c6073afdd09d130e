"""Card PINs and terminal MAC keys as the campus reads and writes them: sealed at rest
(engine/access/secretbox.py, AES-256-GCM), opened when a row is read. A row written before
secrets at rest and not sealed yet still carries its clear value."""

from __future__ import annotations

import hmac
import logging
from typing import Final

import asyncpg

from engine.access.secretbox import SecretBox, SecretError, open_mac_key, open_pin
from engine.campus.model import Terminal, TerminalKind

log = logging.getLogger(__name__)

# A PIN no block can match (verify_pin refuses a non-ASCII PIN): a payment that needs the PIN
# of a card whose sealed PIN does not open is refused (55), and only that one.
_UNUSABLE_PIN: Final = "\ufffd"


def card_pin(box: SecretBox, ledger: int, card_no: str, r: asyncpg.Record) -> str | None:
    """A card row's PIN (columns ``pin`` and ``pin_enc``)."""
    sealed = r["pin_enc"]
    return r["pin"] if sealed is None else open_pin(box, ledger, card_no, sealed)


def payment_pin(box: SecretBox, ledger: int, card_no: str, r: asyncpg.Record) -> str | None:
    """``card_pin`` for the hot path: a value that does not open fails its own payment, never
    the shared statement's whole batch."""
    try:
        return card_pin(box, ledger, card_no, r)
    except SecretError as e:
        log.error("campus: the PIN of card %s does not open: %s", card_no, e)
        return _UNUSABLE_PIN


def terminal_row(r: asyncpg.Record, box: SecretBox) -> Terminal:
    """A row of ``terminals`` as a :class:`Terminal` (its MAC key opened)."""
    sealed = r["mac_key_enc"]
    return Terminal(
        terminal_id=r["terminal_id"],
        merchant_id=r["merchant_id"],
        ledger=r["ledger"],
        kind=TerminalKind(r["kind"]),
        account_id=r["account_id"],
        mac_key=bytes(r["mac_key"]) if sealed is None
        else open_mac_key(box, r["ledger"], r["terminal_id"], sealed),
    )


def same_terminal(a: Terminal, b: Terminal) -> bool:
    """Whether two registrations are the same (the keys compared in constant time)."""
    fields = (a.terminal_id, a.merchant_id, a.ledger, a.kind, a.account_id)
    same_key = hmac.compare_digest(a.mac_key, b.mac_key)
    return same_key and fields == (b.terminal_id, b.merchant_id, b.ledger, b.kind, b.account_id)
