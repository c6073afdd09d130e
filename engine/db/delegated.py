"""Statements that run as a function on the node that owns their ledger (Citus).

Citus plans a data-modifying CTE whose inserts read from ``unnest`` (the batch write) as
several steps run from the coordinator, the inserted rows pulled through it. Wrapped in a
PL/pgSQL function whose first argument is the ledger, distributed with that argument and
co-located with the ledger's tables, the whole statement is sent to the worker owning the
ledger's shards as one call (``force_delegation``: also inside the batch's transaction) and
runs there against its local shards. On a plain PostgreSQL the statement runs as it is; the
functions exist only on a cluster (engine/db/distribute.py creates them).

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


class Delegated(msgspec.Struct, frozen=True):
    """A statement whose ``$1`` is the ledger, runnable as a delegated function."""

    name: str
    sql: str

    @property
    def function(self) -> str:
        """The function's name: the statement's name and a digest of its text."""
        digest = hashlib.sha256(self.sql.encode()).hexdigest()[:12]
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
        if result is None:
            body, returns = f"BEGIN\n{self.sql};\nEND", "void"
        else:
            body = f"DECLARE result {result};\nBEGIN\n{self.sql}\nINTO result;\nRETURN result;\nEND"
            returns = result
        return (
            f"CREATE OR REPLACE FUNCTION {self.function}({', '.join(types)}) RETURNS {returns}"
            f" LANGUAGE plpgsql SET search_path FROM CURRENT AS $onecard$\n{body}\n$onecard$"
        )
