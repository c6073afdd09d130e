"""The shared shape of an access operation that was not carried out."""

from __future__ import annotations

import msgspec


class Refused(msgspec.Struct, frozen=True):
    """Not done, and why: ``reason`` is a stable snake_case code, ``detail`` says it for people;
    ``not_found`` when the reason is that something named does not exist (HTTP 404)."""

    reason: str
    detail: str
    not_found: bool = False
