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
# Under load a committed batch is answered while the next batch's write is on the server; if
# that write has not gone out by then (a clock lock held elsewhere), it is answered anyway.
BATCH_ANSWER_DEFER_MAX_S: Final = 0.25
# ...but only a batch this large: answering a small one costs little, and holding it back
# would add a whole commit to its callers' latency when the load is moderate.
BATCH_ANSWER_DEFER_MIN_TRANSFERS: Final = 512

# -- ledgers per batch ---------------------------------------------------------------------------
# Each ledger of a batch is its own database transaction, committed one after another by the
# single committer (~1-3 ms each), so a batch naming thousands of ledgers held every other
# caller for seconds (8,190 ledgers: ~19 s; the gateway's requests all timed out with 96).
# The committer takes requests only while the batch stays within this many ledger groups; a
# ledger counts again when a transfer id already named in another ledger of the batch forces
# a second round (engine/batcher.py: one id never sits in two ledgers' groups at once).
MAX_LEDGER_GROUPS_PER_BATCH: Final = 64
# A request must fit in one batch: one needing more ledger groups is refused (HTTP 413).
MAX_LEDGER_GROUPS_PER_REQUEST: Final = MAX_LEDGER_GROUPS_PER_BATCH
# What each ledger group of a request beyond its first counts against MAX_QUEUED_TRANSFERS:
# a group's transaction costs about as much as this many transfers of one large batch, so the
# queue's bound stays one of time (a few seconds of work) whatever the ledgers per request.
LEDGER_GROUP_COST: Final = 100
# Ledgers the committer remembers as having a clock row (a transfer to a ledger without one,
# i.e. without accounts, is answered from two reads for the whole batch, no transaction);
# forgotten and re-learned beyond this many, so memory stays bounded.
MAX_KNOWN_LEDGERS: Final = 100_000

# -- HTTP --------------------------------------------------------------------------------------
MAX_BODY_BYTES: Final = 4 * 1024 * 1024  # 8190 transfers of ~400 bytes each
MAX_STATEMENT_LIMIT: Final = 1000
DEFAULT_STATEMENT_LIMIT: Final = 100
RETRY_AFTER_S: Final = 1

# -- HTTP edge (engine/server.py) ----------------------------------------------------------
# Open connections; beyond it a request is answered 503 at once (bounds sockets and memory).
MAX_HTTP_CONNECTIONS: Final = 1024
# A request head (request line and headers) larger than this is refused with 400.
MAX_HEAD_BYTES: Final = 16 * 1024
# A whole request (head and body) must arrive within this of the connection opening or of the
# previous answer; a silent, trickling or stalled client is then disconnected.
REQUEST_READ_TIMEOUT_S: Final = 10.0
# A peer that stops reading its answers (send buffer full) for this long is dropped.
WRITE_STALL_TIMEOUT_S: Final = 10.0
# An idle keep-alive connection is closed after this.
KEEP_ALIVE_S: Final = 5
# In-flight requests are answered for at most this long after SIGTERM, then cancelled.
GRACEFUL_SHUTDOWN_S: Final = 10

# -- the Python runtime --------------------------------------------------------------------------
# Cyclic garbage collection thresholds (generation 0, 1, 2). A batch allocates a hundred
# thousand short-lived objects, none in cycles; at Python's default (700, 10, 10) collections
# took ~18% of the committer's CPU (bench core: 39k vs 47k transfers/s). Generation 0 then
# holds at most this many objects, so memory stays bounded.
GC_THRESHOLDS: Final = (50_000, 50, 100)

# -- background work ---------------------------------------------------------------------------
# A background loop that dies of an error it did not expect is restarted after this pause:
# a dead expirer would leave every hold pending forever.
BACKGROUND_RESTART_S: Final = 1.0

# -- database ----------------------------------------------------------------------------------
DB_POOL_MIN: Final = 2
DB_POOL_MAX: Final = 10
DB_CONNECT_TIMEOUT_S: Final = 5.0
DB_COMMAND_TIMEOUT_S: Final = 30.0
DB_ACQUIRE_TIMEOUT_S: Final = 2.0  # a request waits this long for a connection, then 503
EMBEDDED_SHARED_BUFFERS_MAX_MB: Final = 4096  # the embedded server's cache: RAM/4, at most this
MIGRATION_LOCK_KEY: Final = 0x0C0A4D  # advisory lock serialising concurrent migrators

# -- terminal gateway --------------------------------------------------------------------------
GATEWAY_MAX_CONNECTIONS: Final = 4096  # beyond it a new connection is closed at once
GATEWAY_MAX_FRAME_BYTES: Final = 1024  # the largest message of the profile is < 400 bytes
GATEWAY_IDLE_TIMEOUT_S: Final = 300.0  # no complete frame for this long: the connection closes
GATEWAY_WRITE_TIMEOUT_S: Final = 10.0  # a peer that does not read its answers is dropped
GATEWAY_MAX_INFLIGHT_PER_CONNECTION: Final = 16  # pipelined requests; then reading pauses
GATEWAY_MAX_INFLIGHT: Final = 8192  # requests being processed in total; beyond it 96 at once
GATEWAY_REQUEST_TIMEOUT_S: Final = 10.0  # an answer not ready by then is 96 (the work goes on)
GATEWAY_STOP_GRACE_S: Final = 10.0  # graceful stop waits this long for in-flight requests
GATEWAY_MEMORY_BATCH: Final = 1024  # remembered answers looked up / stored per statement
GATEWAY_DB_POOL_MAX: Final = 3  # the gateway's own connections (answer memory)
