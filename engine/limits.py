"""Every bound in the engine, in one place. Change a limit here, nowhere else."""

from __future__ import annotations

from typing import Final

# -- transfers and batches -----------------------------------------------------------------
MAX_TRANSFERS_PER_REQUEST: Final = 8190  # contract §4: one request is one batch
MAX_ACCOUNTS_PER_REQUEST: Final = 8190
MAX_BATCH_TRANSFERS: Final = 8190  # one database transaction (group commit merges requests)
BATCH_LINGER_S: Final = 0.0005  # how long a small batch waits for company before committing
MAX_QUEUED_TRANSFERS: Final = 65_520  # 8 full batches; beyond it callers get 503 / 96
MAX_EXPIRED_PER_RUN: Final = 8190  # holds released per expirer transaction
EXPIRER_INTERVAL_S: Final = 1.0
BATCH_RETRIES: Final = 3  # a batch whose connection broke is retried (idempotent) this often

# -- HTTP --------------------------------------------------------------------------------------
MAX_BODY_BYTES: Final = 4 * 1024 * 1024  # 8190 transfers of ~400 bytes each
MAX_STATEMENT_LIMIT: Final = 1000
DEFAULT_STATEMENT_LIMIT: Final = 100
RETRY_AFTER_S: Final = 1

# -- database ----------------------------------------------------------------------------------
DB_POOL_MIN: Final = 2
DB_POOL_MAX: Final = 10
DB_CONNECT_TIMEOUT_S: Final = 5.0
DB_COMMAND_TIMEOUT_S: Final = 30.0
DB_ACQUIRE_TIMEOUT_S: Final = 2.0  # a request waits this long for a connection, then 503
MIGRATION_LOCK_KEY: Final = 0x0C0A4D  # advisory lock serialising concurrent migrators
