"""Which database faults are worth retrying: one classification for the whole engine.

The base is ``CONNECTION_LOST``: the database went away under a statement (connection refused
or lost, the server shutting down, restarting or out of connections, a connection whose
protocol state died with its backend). Each caller adds what its retry is safe for:

- ``RETRYABLE`` (the batcher, the campus, the expirer): a whole transaction retried; also a
  deadlock or serialization failure, since the transaction rolled back, and a committed
  transfer answers ``exists`` the second time (idempotency).
- ``DATABASE_AWAY`` (the HTTP edge answers 503, never 500): the client may retry; also any
  operator intervention (a cancelled query included) and any lack of resources.
- ``OUTLIVED`` (background loops: the snapshot scheduler): every database error, the loop
  tries again later.
"""

from __future__ import annotations

from typing import Final

import asyncpg

__all__ = ["CONNECTION_LOST", "DATABASE_AWAY", "OUTLIVED", "RETRYABLE"]

CONNECTION_LOST: Final = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # protocol state left behind by a terminated backend
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    OSError,
    TimeoutError,
)

RETRYABLE: Final = (
    *CONNECTION_LOST,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)

# CannotConnectNow, AdminShutdown and CrashShutdown are OperatorInterventionErrors, and
# TooManyConnections an InsufficientResourcesError: the edge takes the whole classes.
DATABASE_AWAY: Final = (
    *CONNECTION_LOST,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)

# Every PostgresError covers the server-side part of CONNECTION_LOST; InternalClientError (a
# client-side protocol state) was never in this list and is still not.
OUTLIVED: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)
