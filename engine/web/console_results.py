"""The card counter's answers (contract §8): words for every outcome a form of the console's
holder page can have, in one table.

A form's ``#result`` keeps ``data-status`` = the outcome's code, as the contract fixes it: the
card's status after the form (``active``, ``lost``, ...), ``created`` for an activation code,
the registry's refusal (``Refusal`` of engine/campus/model.py; the activation's refusals of
engine/access/holders.py spell theirs the same), or the form's own (``FormRefusal``). The
words depend on the form too: ``lost`` after "report lost" is news, after "issue card" it is
not. So the words are looked up as ``<form>:<outcome>``, then ``<outcome>`` alone, where a
form that succeeded is ``done`` or ``unchanged`` (it was so already).
"""

from __future__ import annotations

import enum
from typing import Final

import msgspec

from engine.campus.model import Refusal
from engine.web.i18n import N_
from engine.web.results import Words, pick


class Form(enum.StrEnum):
    """A form of the holder page (the card actions spelled as their paths)."""

    ISSUE = "issue"
    REPORT_LOST = "report-lost"
    FOUND = "found"
    REPLACE = "replace"
    CLOSE = "close"
    ACTIVATION = "activation"


class FormRefusal(enum.StrEnum):
    """Input a form refuses before asking the registry (HTTP 400, nothing changed)."""

    INVALID_CARD_NO = "invalid_card_no"
    INVALID_PIN = "invalid_pin"
    INVALID_AMOUNT = "invalid_amount"


class Change(enum.StrEnum):
    """A form that was carried out: it changed something, or it was so already."""

    DONE = "done"
    UNCHANGED = "unchanged"


Outcome = Change | Refusal | FormRefusal

_NOTHING: Final = N_("Nothing was changed.")
RESULTS: Final[dict[str, Words]] = {
    # -- refusals, whichever form met them
    Refusal.HOLDER_NOT_FOUND: Words(
        N_("Holder not found"), N_("There is no such holder (any more). Nothing was changed.")),
    Refusal.CARD_NOT_FOUND: Words(
        N_("Card not found"), N_("No card has this number. Nothing was changed.")),
    Refusal.ACCOUNT_NOT_FOUND: Words(
        N_("Account not found"),
        N_("An account this needs does not exist. Nothing was changed; tell an administrator.")),
    Refusal.AMBIGUOUS_HOLDER: Words(
        N_("Holder id in several ledgers"),
        N_("This holder id exists in more than one ledger; open the holder from the search to "
           "choose one. Nothing was changed.")),
    Refusal.CARD_NUMBER_TAKEN: Words(
        N_("Card number taken"),
        N_("This card number is already in use. Nothing was changed; check the number printed "
           "on the card.")),
    Refusal.HOLDER_HAS_ACTIVE_CARD: Words(
        N_("Holder already has an active card"),
        N_("A holder has one active card at a time. Nothing was changed; report the active "
           "card lost and replace it, or close it first.")),
    Refusal.INVALID_TRANSITION: Words(
        N_("Not possible in this card's state"),
        N_("This card's state does not allow it. Nothing was changed.")),
    Refusal.ACCOUNT_NOT_CREDITABLE: Words(
        N_("Account cannot be credited"),
        N_("This account cannot receive money this way. Nothing was changed; tell an "
           "administrator.")),
    Refusal.ACCOUNT_ID_TAKEN: Words(
        N_("Account id taken"),
        N_("An account id this needs belongs to another account. Nothing was changed; tell an "
           "administrator.")),
    FormRefusal.INVALID_CARD_NO: Words(
        N_("Not a card number"), N_("A card number has 8 to 19 digits. Nothing was changed.")),
    FormRefusal.INVALID_PIN: Words(
        N_("Not a PIN"), N_("A PIN has 4 to 6 digits, or leave it empty. No card was issued.")),
    FormRefusal.INVALID_AMOUNT: Words(N_("Amount not accepted"), _NOTHING),
    # -- issue card
    "issue:done": Words(
        N_("Card issued"), N_("The card is active: the holder can pay with it now.")),
    "issue:unchanged": Words(
        N_("Card already issued"),
        N_("This card was already issued to this holder; nothing was changed. The table "
           "below shows its state.")),
    "issue:card_number_taken": Words(
        N_("Card number taken"),
        N_("This card number belongs to another holder. No card was issued; check the number "
           "printed on the card.")),
    "issue:holder_has_active_card": Words(
        N_("Holder already has an active card"),
        N_("A holder has one active card at a time. No card was issued; to give a new card, "
           "use Replace on the active one.")),
    # -- report lost
    "report-lost:done": Words(
        N_("Card reported lost"),
        N_("The card is blocked and the holder's purses are frozen: nobody can pay with it. "
           "The money stays.")),
    "report-lost:unchanged": Words(
        N_("Already reported lost"), N_("The card was already lost; nothing was changed.")),
    "report-lost:invalid_transition": Words(
        N_("Cannot be reported lost"),
        N_("Only an active card can be reported lost; this one is replaced or closed. Nothing "
           "was changed.")),
    # -- found
    "found:done": Words(
        N_("Card active again"),
        N_("The card works again; the holder's purses are unfrozen unless another of their "
           "cards is lost.")),
    "found:unchanged": Words(
        N_("Card already active"), N_("The card was not lost; nothing was changed.")),
    "found:invalid_transition": Words(
        N_("Cannot be made active"),
        N_("Only a lost card can be found; this one is replaced or closed. Nothing was "
           "changed.")),
    "found:holder_has_active_card": Words(
        N_("Holder has another active card"),
        N_("The holder was given another card meanwhile, so this one stays lost. Nothing was "
           "changed; close it instead.")),
    # -- replace
    "replace:done": Words(
        N_("Card replaced"),
        N_("The new card is active with the same purses, balance, limit and PIN; the old card "
           "no longer works.")),
    "replace:unchanged": Words(
        N_("Already replaced"),
        N_("The card was already replaced by this new number; nothing was changed.")),
    "replace:invalid_transition": Words(
        N_("Cannot be replaced"),
        N_("Only an active or lost card can be replaced; this one is already replaced or "
           "closed. Nothing was changed.")),
    "replace:card_number_taken": Words(
        N_("New card number taken"),
        N_("The new card number is already in use. Nothing was changed; check the number "
           "printed on the new card.")),
    "replace:holder_has_active_card": Words(
        N_("Holder has another active card"),
        N_("The holder already has another active card. Nothing was changed; report it lost "
           "or close it first.")),
    # -- close
    "close:done": Words(
        N_("Card closed"),
        N_("The card no longer works, for good. The money stays in the holder's purses.")),
    "close:unchanged": Words(
        N_("Already closed"), N_("The card was already closed; nothing was changed.")),
    "close:invalid_transition": Words(
        N_("Cannot be closed"),
        N_("This card was replaced and already no longer works. Nothing was changed.")),
    # -- new activation code
    "activation:done": Words(
        N_("Activation code made"),
        N_("Give the code below to the holder; it is shown only this once. Any earlier code no "
           "longer works.")),
    "activation:ambiguous_holder": Words(
        N_("No activation code"),
        N_("This holder id exists in more than one ledger, so self-service cannot tell the "
           "holders apart: none of them can activate or log in. An administrator has to give "
           "one of them another id.")),
}
# Only for an outcome missing above (tests/web/test_console_results.py: none is).
OTHER: Final = Words(N_("Not done"), _NOTHING)


def words(form: Form, outcome: Outcome) -> Words:
    """What the clerk reads after ``form`` answered ``outcome``."""
    return pick(RESULTS, f"{form}:{outcome}", outcome, default=OTHER)


class Answer(msgspec.Struct, frozen=True):
    """A form's ``#result``: its ``data-status``, which words (``<form>:<outcome>``, also its
    class) and the words; ``detail`` is a msgid saying more (why an amount was refused)."""

    status: str
    key: str
    words: Words
    detail: str | None = None


def carried_out(form: Form, status: str, *, changed: bool) -> Answer:
    """The answer of a form that was carried out; ``status`` is the card's status after it
    (``created`` for an activation code)."""
    outcome = Change.DONE if changed else Change.UNCHANGED
    return Answer(status, f"{form}:{outcome}", words(form, outcome))


def refused(form: Form, reason: Refusal | FormRefusal, *, detail: str | None = None) -> Answer:
    """The answer of a form that changed nothing: ``data-status`` is the reason."""
    return Answer(reason.value, f"{form}:{reason}", words(form, reason), detail)
