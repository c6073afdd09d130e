"""schemathesis against the live server's /openapi.json: every documented operation, with data
that fits the schema and data that does not, with the admin token. No answer may be a 5xx,
every error must have the contract's shape, and the guarded ledger must not move."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.faults.conftest import Target
from tests.faults.harness import ADMIN

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 8  # per generation mode
ERROR_KEYS = {"error", "detail"}


def _run(url: str) -> dict[str, int]:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    seen: dict[str, int] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=op.as_strategy(generation_mode=mode, headers=dict(ADMIN)))
            def one(case: Any) -> None:
                case.headers = {**(case.headers or {}), **ADMIN}
                r = case.call(base_url=url, timeout=10)
                key = f"{case.method} {case.path} {r.status_code}"
                seen[key] = seen.get(key, 0) + 1
                assert r.status_code < 500, (
                    case.method,
                    case.formatted_path,
                    r.status_code,
                    r.text,
                )
                if r.status_code >= 400:
                    assert set(r.json()) == ERROR_KEYS, r.text

            try:
                one()
            except Unsatisfiable:  # no negative data exists for an operation without inputs
                assert mode == GenerationMode.NEGATIVE, op.label
    return seen


async def test_schemathesis(target: Target) -> None:
    before = await target.fingerprint()
    seen = await asyncio.to_thread(_run, target.url)
    assert await target.fingerprint() == before, "generated requests moved guarded money"
    assert await target.unbalanced_ledgers() == []
    operations = {k.rsplit(" ", 1)[0] for k in seen}
    assert {"POST /v1/transfers", "POST /v1/accounts"} <= operations, sorted(operations)
    assert any(k.endswith(" 200") for k in seen), "nothing valid was ever generated"
    print("\nschemathesis:", sum(seen.values()), "requests;", dict(sorted(seen.items())))
