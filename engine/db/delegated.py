"""Statements that run as a function on the node that owns their ledger (Citus).

Citus plans a data-modifying CTE whose inserts read from ``unnest`` (the batch write) as
several steps run from the coordinator, the inserted rows pulled through it. A PL/pgSQL
function whose first argument is the ledger, distributed with that argument and co-located
with the ledger's tables, is sent whole to the worker owning the ledger's shards as one call
(``force_delegation``: also inside the batch's transaction) and runs there on its local
shards. The function does the statement's work as separate statements (``steps``, after an
optional ``guard``): Citus plans each of those in a fraction of a millisecond, where the one
CTE took it 7 ms on the worker (and 32 ms from the coordinator) per batch. On a plain
PostgreSQL the one statement runs as it is; the functions exist only on a cluster
(engine/db/distribute.py creates them; tests/db/test_delegated.py runs them on one server).

A function's name carries a digest of its statement, so an engine never calls a function
made from another version of it, and the versions of engines still running during an upgrade
stay in place (``distribute`` adds, never replaces).
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

import msgspec

PREFIX: Final = "onecard_delegated_"


class Delegated(msgspec.Struct, frozen=True, kw_only=True):
    """A statement whose ``$1`` is the ledger, runnable as a delegated function that runs
    ``steps`` (the statement's parts, with its parameters) one after the other. With a
    ``guard``, a statement run first: if it touches no row the function answers 0 and runs
    nothing else, otherwise it answers how many rows the guard touched (``sql``'s answer)."""

    name: str
    sql: str
    steps: tuple[str, ...]
    guard: str | None = None

    @property
    def function(self) -> str:
        """The function's name: the statement's name and a digest of its text and body."""
        text = "\n;\n".join((self.sql, self.guard or "", *self.steps))
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        return f"{PREFIX}{self.name}_{digest}"

    @property
    def arity(self) -> int:
        """How many parameters the statement takes."""
        return max(int(n) for n in re.findall(r"\$(\d+)", self.sql))

    @property
    def call(self) -> str:
        """The statement that calls the function (the one form Citus delegates)."""
        args = ", ".join(f"${i}" for i in range(1, self.arity + 1))
        return f"SELECT {self.function}({args})"

    def definition(self, types: list[str], result: str | None) -> str:
        """CREATE FUNCTION for the statement with parameter ``types`` and ``result`` type
        (None: it answers nothing). PL/pgSQL: Citus cannot plan a distributed statement in a
        SQL function that uses its parameters. The tables are found on the search_path the
        function was created with, whatever the caller's."""
        steps = "".join(f"{step};\n" for step in self.steps)
        if result is None:
            assert self.guard is None, "a guarded function answers the guard's row count"
            body, returns = f"BEGIN\n{steps}END", "void"
        else:
            assert self.guard is not None, "a function that answers has a guard"
            body = (f"DECLARE touched {result};\nBEGIN\n{self.guard};\n"
                    "GET DIAGNOSTICS touched = ROW_COUNT;\n"
                    "IF touched = 0 THEN RETURN 0; END IF;\n"
                    f"{steps}RETURN touched;\nEND")
            returns = result
        return (
            f"CREATE OR REPLACE FUNCTION {self.function}({', '.join(types)}) RETURNS {returns}"
            f" LANGUAGE plpgsql SET search_path FROM CURRENT AS $onecard$\n{body}\n$onecard$"
        )
