"""The gateway's answer memory: ``gateway_responses`` (migrations/0003_gateway.sql).

Every financial answer is stored before it is sent, so a retransmission, even after a restart,
gets the identical answer (same RRN, same field 54). A given-up request's 96 is stored together
with the request's own reversal (``AnswerMemory.claim``, see terminals/giveup.py). Lookups,
stores and claims are each one set-based statement per batch of requests (Coalescer).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final
from uuid import UUID

import msgspec

from engine import limits
from engine.db.coalesce import Coalescer, Connection
from terminals.iso8583 import Message, ResponseCode
from terminals.operations import rrn_for

if TYPE_CHECKING:
    import asyncpg

__all__ = ["Answer", "AnswerMemory", "given_up"]

# An RRN collision inside one ledger (62 bits of a hash) is astronomically rare; each retry
# derives the next candidate, so a handful of attempts is certainty in practice.
_RRN_ATTEMPTS: Final = 8

SQL_LOOKUP_ANSWERS: Final = """
SELECT key, request_digest, response
FROM gateway_responses
WHERE ledger = $1 AND key = ANY($2::uuid[])
"""
SQL_STORE_ANSWERS: Final = """
INSERT INTO gateway_responses (ledger, key, terminal_id, request_digest, rrn, response)
SELECT $1, u.key, u.terminal_id, u.digest, u.rrn, u.response
FROM unnest($2::uuid[], $3::text[], $4::bytea[], $5::text[], $6::bytea[])
     AS u(key, terminal_id, digest, rrn, response)
ON CONFLICT DO NOTHING
RETURNING key
"""
# A given-up request's 96 stored as its answer and, in the same statement (both or neither), a
# reversal of the request itself remembered in the campus's reversal memory (see
# engine.campus.SQL_REMEMBER_REVERSAL; the reversal's key is the request's own). Only a key
# whose answer this statement stores is reversed: an answer stored before stays the truth.
SQL_CLAIM_ANSWERS: Final = """
WITH stored AS (
    INSERT INTO gateway_responses (ledger, key, terminal_id, request_digest, rrn, response)
    SELECT $1, u.key, u.terminal_id, u.digest, u.rrn, u.response
    FROM unnest($2::uuid[], $3::text[], $4::bytea[], $5::text[], $6::bytea[])
         AS u(key, terminal_id, digest, rrn, response)
    ON CONFLICT DO NOTHING
    RETURNING key, terminal_id
), reversed AS (
    INSERT INTO reversals (ledger, original_key, key, terminal_id, created_at)
    SELECT $1, s.key, s.key, s.terminal_id, $7 FROM stored s
    ON CONFLICT (ledger, original_key) DO NOTHING
)
SELECT key FROM stored
"""


class Answer(msgspec.Struct, frozen=True):
    """A decided answer: the digest of the request it answers, the answer, and whether it is
    stored (so a retransmission gets it again)."""

    digest: bytes
    response: Message
    remembered: bool


class _Row(msgspec.Struct, frozen=True):
    key: UUID
    terminal_id: str
    digest: bytes
    rrn: str
    response: bytes


_encode_answer = msgspec.json.Encoder().encode
_decode_answer = msgspec.json.Decoder(Message).decode


class AnswerMemory:
    """Remembered answers in ``gateway_responses`` (see migrations/0003_gateway.sql).

    Lookups and stores are each coalesced (engine.db.coalesce.Coalescer): the requests that arrive
    while one statement runs share the next, so each is one statement per batch of requests,
    on one connection held while the work keeps coming.
    """

    def __init__(self, pool: asyncpg.Pool, *, max_batch: int = limits.GATEWAY_MEMORY_BATCH):
        self._pool = pool

        def get_pool() -> asyncpg.Pool:
            return self._pool

        self._lookups: Coalescer[UUID, Answer | None] = Coalescer(
            get_pool, self._lookup_batch, max_batch=max_batch, name="onecard-gateway-lookups"
        )
        self._stores: Coalescer[_Row, bool] = Coalescer(
            get_pool, self._store_batch, max_batch=max_batch, name="onecard-gateway-stores"
        )
        self._claims: Coalescer[_Row, bool] = Coalescer(
            get_pool, self._claim_batch, max_batch=max_batch, name="onecard-gateway-claims"
        )

    @property
    def statements(self) -> int:
        """Statements run so far (each serves a batch of lookups or of stores)."""
        return self._lookups.statements + self._stores.statements + self._claims.statements

    async def lookup(self, ledger: int, key: UUID) -> Answer | None:
        """The remembered answer for ``key``, or None."""
        return await self._lookups.ask(ledger, key)

    async def remember(
        self, ledger: int, key: UUID, terminal_id: str, digest: bytes, response: Message
    ) -> Answer:
        """Store ``response`` (with its RRN) unless an answer for ``key`` exists already;
        return the answer that is stored (this one, or the earlier one that won)."""
        return await self._store(self._stores, ledger, key, terminal_id, digest, response)

    async def claim(
        self, ledger: int, key: UUID, terminal_id: str, digest: bytes, response: Message
    ) -> Answer:
        """Store a given-up request's 96 as :meth:`remember` does and, in the same statement,
        remember a reversal of the request itself (SQL_CLAIM_ANSWERS), unless an answer for
        ``key`` exists already; return the answer that is stored (the 96, or the earlier one,
        which is then left alone and nothing is reversed)."""
        return await self._store(self._claims, ledger, key, terminal_id, digest, response)

    async def _store(
        self,
        writer: Coalescer[_Row, bool],
        ledger: int,
        key: UUID,
        terminal_id: str,
        digest: bytes,
        response: Message,
    ) -> Answer:
        for attempt in range(_RRN_ATTEMPTS):
            answer = msgspec.structs.replace(response, rrn=rrn_for(key, attempt))
            row = _Row(key, terminal_id, digest, answer.rrn or "", _encode_answer(answer))
            if await writer.ask(ledger, row):
                return Answer(digest, answer, True)
            stored = await self.lookup(ledger, key)
            if stored is not None:
                return stored
            # neither inserted nor present: the RRN is taken in this ledger; next candidate
        raise RuntimeError(f"no free RRN for {key} after {_RRN_ATTEMPTS} attempts")

    @staticmethod
    async def _lookup_batch(
        conn: Connection, ledger: int, keys: list[UUID]
    ) -> list[Answer | None]:
        rows = await conn.fetch(SQL_LOOKUP_ANSWERS, ledger, list(set(keys)))
        found = {
            r["key"]: Answer(bytes(r["request_digest"]), _decode_answer(r["response"]), True)
            for r in rows
        }
        return [found.get(k) for k in keys]

    @staticmethod
    async def _store_batch(conn: Connection, ledger: int, rows: list[_Row]) -> list[bool]:
        inserted = await conn.fetch(
            SQL_STORE_ANSWERS,
            ledger,
            [r.key for r in rows],
            [r.terminal_id for r in rows],
            [r.digest for r in rows],
            [r.rrn for r in rows],
            [r.response for r in rows],
        )
        done = {r["key"] for r in inserted}
        return [r.key in done for r in rows]

    @staticmethod
    async def _claim_batch(conn: Connection, ledger: int, rows: list[_Row]) -> list[bool]:
        inserted = await conn.fetch(
            SQL_CLAIM_ANSWERS,
            ledger,
            [r.key for r in rows],
            [r.terminal_id for r in rows],
            [r.digest for r in rows],
            [r.rrn for r in rows],
            [r.response for r in rows],
            time.time_ns(),
        )
        done = {r["key"] for r in inserted}
        return [r.key in done for r in rows]


# ---------------------------------------------------------------------------------------
# The gateway


def given_up(answer: Answer) -> bool:
    """Whether a stored answer is the 96 of a request the gateway gave up (the only 96 that is
    ever stored: every other one is sent without being remembered)."""
    return answer.response.response_code == ResponseCode.SYSTEM_ERROR
