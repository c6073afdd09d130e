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

# -- HTTP --------------------------------------------------------------------------------------
MAX_BODY_BYTES: Final = 4 * 1024 * 1024  # 8190 transfers of ~400 bytes each
MAX_STATEMENT_LIMIT: Final = 1000
DEFAULT_STATEMENT_LIMIT: Final = 100
RETRY_AFTER_S: Final = 1

# -- HTTP edge (engine/http/server.py) ----------------------------------------------------------
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

# -- finance ----------------------------------------------------------------------------------
STREAM_CHUNK_ROWS: Final = 20_000  # rows per server-side cursor fetch: bounded client memory
# The snapshot scheduler re-reads the clock at least this often, so a wall-clock jump or a
# time-zone offset change delays a snapshot by at most this much.
SNAPSHOT_SCHEDULER_MAX_SLEEP_S: Final = 60.0
# After a database error the scheduler tries again this much later (the API keeps running).
SNAPSHOT_SCHEDULER_RETRY_S: Final = 30.0

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

# -- people, roles and keys (engine/access/) ---------------------------------------------------
# Shortest passwords accepted (contract §6: operators 10, holders 8 characters).
MIN_OPERATOR_PASSWORD: Final = 10
MIN_HOLDER_PASSWORD: Final = 8
# Nobody types more than this; a longer "password" only costs hashing time.
MAX_PASSWORD_BYTES: Final = 1024
# Argon2id cost: the RFC 9106 second recommended option (t=3, 64 MiB, 4 lanes), ~50 ms here.
ARGON2_TIME_COST: Final = 3
ARGON2_MEMORY_KIB: Final = 64 * 1024
ARGON2_PARALLELISM: Final = 4
# Hashes computed at once (each in a worker thread, 64 MiB each): bounds memory and keeps two
# cores for the payments while logins arrive in a burst.
MAX_CONCURRENT_PASSWORD_HASHES: Final = 2
# Lockout (contract §7): this many failed tries of one subject within the window lock it for
# LOCKOUT_S, during which even the right password is refused.
LOCKOUT_FAILURES: Final = 5
LOCKOUT_WINDOW_S: Final = 15 * 60
LOCKOUT_S: Final = 15 * 60
# Global bound on login and activation attempts per engine process (a token bucket): a spray
# over many holder ids cannot make more than this many guesses per second, and the Argon2
# hashing behind them cannot crowd out the terminals.
LOGIN_ATTEMPTS_PER_S: Final = 10.0
LOGIN_ATTEMPTS_BURST: Final = 20
# Activation codes (contract §6): 8 digits, valid 72 hours, single use.
ACTIVATION_CODE_DIGITS: Final = 8
ACTIVATION_CODE_TTL_S: Final = 72 * 3600
# Sessions of the web doors end after this long without a request (contract §7).
SESSION_IDLE_S: Final = 30 * 60
# API keys: a looked-up key is trusted this long without asking the database again; a
# revocation or an operator's disabling reaches every engine process at once by NOTIFY, and
# within this long even if the notification was lost. Bounded like every cache.
CREDENTIAL_CACHE_S: Final = 1.0
MAX_CACHED_CREDENTIALS: Final = 4096
# Decrypted secrets (PINs, MAC keys) kept in memory so the terminal hot path does not run
# AES-GCM per request; bounded, oldest out first.
MAX_CACHED_SECRETS: Final = 262_144
# A process using a key file re-reads it at most this often (after `onecard rotate-secret`).
SECRET_KEY_RELOAD_S: Final = 1.0
# Operator log: entries appended in one transaction at most (group commit of concurrent writes)
MAX_OPERATOR_LOG_BATCH: Final = 512
# The log writer keeps its connection this long after its last append for the next one (taking
# a pooled connection per append cost more than the append at a few hundred writes/s).
OPERATOR_LOG_LINGER_S: Final = 0.05
MAX_OPERATOR_LOG_LIMIT: Final = 1000
DEFAULT_OPERATOR_LOG_LIMIT: Final = 100
# Longest text kept in an operator log field (a target naming many ids is cut, never a secret).
MAX_OPERATOR_LOG_FIELD: Final = 200
