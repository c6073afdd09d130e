"""A form's answer, ``#result`` (contract §7, §8): ``data-status`` is the outcome's code (fixed
by the contract, for machines), and a heading and a sentence say it for people in the page's
language.

Each form keeps one table from its outcomes to ``Words`` (msgids marked with ``N_``; the
``result_notice`` macro of templates/macros.html translates them where shown), looked up most
specific key first with ``pick``. Tests read the tables to check that every outcome has words
in every catalog.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple


class Words(NamedTuple):
    """What a person reads about an outcome: a heading and a sentence (msgids)."""

    title: str
    message: str


def pick(table: Mapping[str, Words], *keys: str, default: Words | None = None) -> Words:
    """The words of the first of ``keys`` in ``table``, else ``default`` (KeyError if none)."""
    for key in keys:
        found = table.get(key)
        if found is not None:
            return found
    if default is None:
        raise KeyError(keys)
    return default
