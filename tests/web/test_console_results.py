"""Every outcome of every form of the console's holder page has its own words, in Chinese and
in English (engine/web/console_results.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from babel.messages.pofile import read_po

from engine.campus.model import Refusal
from engine.web import i18n
from engine.web.console_results import (
    OTHER,
    RESULTS,
    Change,
    Form,
    FormRefusal,
    Outcome,
    carried_out,
    refused,
    words,
)
from engine.web.i18n import Lang
from engine.web.results import Words


def outcomes(form: Form) -> Iterator[Outcome]:
    """What ``form`` can answer: carried out (a new activation code is never "so already"), or
    refused by the registry or by the form itself."""
    yield Change.DONE
    if form is not Form.ACTIVATION:
        yield Change.UNCHANGED
    yield from Refusal
    yield from FormRefusal


ALL = [(form, outcome) for form in Form for outcome in outcomes(form)]


@pytest.mark.parametrize(("form", "outcome"), ALL, ids=[f"{f}:{o}" for f, o in ALL])
def test_every_outcome_has_its_words(form: Form, outcome: Outcome) -> None:
    assert words(form, outcome) is not OTHER


def test_a_form_that_was_carried_out_says_what_it_did() -> None:
    """Not one sentence for all: each form's done and unchanged are its own."""
    said = {words(form, outcome) for form, outcome in ALL if isinstance(outcome, Change)}
    assert len(said) == len([1 for _, outcome in ALL if isinstance(outcome, Change)])


def test_every_key_names_a_form_and_an_outcome() -> None:
    """No words under a key nothing looks up (a misspelt form or outcome)."""
    looked_up = {str(o) for f in Form for o in outcomes(f)}
    looked_up |= {f"{f}:{o}" for f in Form for o in outcomes(f)}
    assert sorted(set(RESULTS) - looked_up) == []


def _catalog(lang: Lang) -> dict[str, str]:
    with i18n.catalog_file(lang).open("rb") as f:
        return {str(m.id): str(m.string) for m in read_po(f) if m.id and not m.fuzzy}


def _msgids() -> list[str]:
    return sorted({msgid for w in [*RESULTS.values(), OTHER] for msgid in w})


@pytest.mark.parametrize("lang", list(Lang))
def test_every_word_is_in_both_catalogs(lang: Lang) -> None:
    catalog = _catalog(lang)
    missing = [m for m in _msgids() if not catalog.get(m, "").strip()]
    assert missing == []
    if lang is Lang.ZH:
        english = [m for m in _msgids() if not any("\u4e00" <= c <= "\u9fff" for c in catalog[m])]
        assert english == []


def test_the_answers_keep_the_outcome_as_data_status() -> None:
    lost = carried_out(Form.REPORT_LOST, "lost", changed=True)
    assert (lost.status, lost.key) == ("lost", "report-lost:done")
    assert lost.words == Words("Card reported lost", lost.words.message)
    assert i18n.translations(Lang.ZH).gettext(lost.words.title) == "卡已挂失"
    again = carried_out(Form.REPORT_LOST, "lost", changed=False)
    assert again.status == "lost" and again.words != lost.words
    taken = refused(Form.REPLACE, Refusal.CARD_NUMBER_TAKEN)
    assert (taken.status, taken.key) == ("card_number_taken", "replace:card_number_taken")
    assert taken.words != words(Form.ISSUE, Refusal.CARD_NUMBER_TAKEN)
    amount = refused(Form.ISSUE, FormRefusal.INVALID_AMOUNT, detail="Enter an amount in yuan.")
    assert (amount.status, amount.detail) == ("invalid_amount", "Enter an amount in yuan.")
