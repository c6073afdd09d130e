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

# -- HTTP edge (engine/http/server.py) ---------------------------------------------------------
# Open connections (bounds sockets and memory). A newcomer beyond it takes the slot of a
# connection still waiting for its request head (engine/slots.py: the most crowded peer's
# oldest); only when every connection is busy with a request is it answered 503 at once.
MAX_HTTP_CONNECTIONS: Final = 1024
# Connections from one peer (an IPv4 address, an IPv6 /64): a flood from one address then
# only ever displaces its own connections. Half the total, so a campus NAT or a load
# generator on one host (500 clients) still fits, while one address cannot take it all.
HTTP_MAX_CONNECTIONS_PER_PEER: Final = 512
# A request head (request line and headers) larger than this is refused with 400, however
# its bytes are split into reads.
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
# Open terminal connections. A newcomer beyond it takes the slot of a connection that has not
# yet sent a frame whose MAC verified (engine/slots.py: the most crowded peer's oldest); only
# when every connection is a verified terminal is it closed at once.
GATEWAY_MAX_CONNECTIONS: Final = 4096
# Connections from one peer address (IPv4, or IPv6 /64). A canteen's tills may all sit behind
# one NAT address: dozens, not hundreds, so 512 is generous and still leaves 7/8 of the slots
# to everyone else; the simulator's and bench's default 500 terminals on one host fit.
GATEWAY_MAX_CONNECTIONS_PER_PEER: Final = 512
# A new connection must send a frame whose MAC verifies for a known terminal within this, or
# it is closed: without it, idle connections that never send a byte held their slots for the
# whole idle timeout. Terminals send their sign-on or first request right after connecting.
GATEWAY_FIRST_FRAME_TIMEOUT_S: Final = 10.0
# Connections the kernel holds for the gateway to accept. Not tied to the connection cap: a
# newcomer beyond the cap may take an unverified connection's slot, and under a flood of
# connects a short queue drops a terminal's handshake, which it then retries only after 1 s.
GATEWAY_LISTEN_BACKLOG: Final = 4096
GATEWAY_MAX_FRAME_BYTES: Final = 1024  # the largest message of the profile is < 400 bytes
# The terminal codec remembers how to read each pair of bitmaps it has seen (a few dozen in
# real traffic: one per message shape); past this many it reads new ones without remembering.
ISO8583_CACHED_PLANS: Final = 1024
GATEWAY_IDLE_TIMEOUT_S: Final = 300.0  # no complete frame for this long: the connection closes
GATEWAY_WRITE_TIMEOUT_S: Final = 10.0  # a peer that does not read its answers is dropped
GATEWAY_MAX_INFLIGHT_PER_CONNECTION: Final = 16  # pipelined requests; then reading pauses
GATEWAY_MAX_INFLIGHT: Final = 8192  # requests being processed in total; beyond it 96 at once
GATEWAY_REQUEST_TIMEOUT_S: Final = 10.0  # an answer not ready by then is 96 (the work goes on)
GATEWAY_STOP_GRACE_S: Final = 10.0  # graceful stop waits this long for in-flight requests
GATEWAY_MEMORY_BATCH: Final = 1024  # remembered answers looked up / stored per statement
GATEWAY_DB_POOL_MAX: Final = 3  # the gateway's own connections (answer memory)
# A money-moving request still at work when its deadline passes, or whose work fails (the
# database failed under it, maybe after its posting committed), is given up: its 96 is stored
# with its own reversal, then what it posted is taken back (contract §5 v4: a 96 moved no
# money). Those steps need the database; while it is away each is retried, from the first
# pause doubling up to the second, for as long as the gateway runs.
GATEWAY_GIVE_UP_RETRY_S: Final = 0.1
GATEWAY_GIVE_UP_RETRY_MAX_S: Final = 5.0
# How long a given-up request waits for its 96 to be stored before it is sent anyway (if
# nothing else can be stored for it) or the connection is closed unanswered (if its own answer
# may be being stored): on top of the deadline, only while the database is slow or away.
GATEWAY_GIVE_UP_WAIT_S: Final = 2.0
# A gateway that starts takes back again what the requests given up in this window may have
# posted (a process that died between storing a 96 and taking the postings back); a give-up
# happens only when ledger writes stall past the deadline or the database fails under the
# work, so the window holds few, and at most this many are looked at.
GATEWAY_SWEEP_WINDOW_S: Final = 86_400.0
GATEWAY_SWEEP_MAX: Final = 100_000

# -- gateway worker processes (onecard serve --gateway-workers N) -------------------------------
# Each worker is a whole engine on the same database: its own pool (DB_POOL_MAX), answer
# memory pool (GATEWAY_DB_POOL_MAX) and committer, and its own copy of the per-gateway caps
# above. 16 workers may hold ~210 PostgreSQL connections (serve warns when the server's
# max_connections has no room for them); more processes than cores only add commits.
GATEWAY_MAX_WORKERS: Final = 16
GATEWAY_WORKER_START_TIMEOUT_S: Final = 60.0  # a worker not listening by then fails the start
# A stopping worker answers what it has read (GATEWAY_STOP_GRACE_S), lets its flights land (the
# same again) and drains its committer: past this it is killed.
GATEWAY_WORKER_STOP_TIMEOUT_S: Final = 3 * GATEWAY_STOP_GRACE_S
# A worker that dies is started again after this pause (its successor's sweep finishes the
# undo of whatever it had given up); more than GATEWAY_WORKER_RESTARTS deaths within
# GATEWAY_WORKER_RESTART_WINDOW_S is a crash loop: serve stops and exits non-zero.
GATEWAY_WORKER_RESTART_S: Final = 1.0
GATEWAY_WORKER_RESTARTS: Final = 5
GATEWAY_WORKER_RESTART_WINDOW_S: Final = 60.0

# -- terminal amounts and PINs (contract §5) ----------------------------------------------------
# Fields 4 and 54 carry 12 digits of fen. A purse or room whose balance after an operation lies
# beyond this could not be shown in the answer: such an operation is refused (13) before
# anything is posted, never posted and then answered 96.
TERMINAL_FIELD_MAX_FEN: Final = 10**12 - 1
# The most one terminal operation may move (13 above it): 10,000.00 yuan. Offline advices and
# room meter advices post with force, so this bounds what one message, from a faulty terminal
# or a leaked terminal key, can push a purse below zero by.
TERMINAL_MAX_AMOUNT_FEN: Final = 1_000_000
# Wrong PINs a card may have in a campus-local day; after them every PIN-checked request of the
# card answers 75 until the next day or until the card office resets the count. Without it a
# balance inquiry is a free PIN oracle (10,000 four-digit PINs) for anyone with a terminal key.
PIN_TRIES_PER_DAY: Final = 5

# -- web pages (/self, /console: engine/web) ------------------------------------------------------
# Contract §7: a session unused for this long is over (the holder logs in again).
WEB_SESSION_IDLE_S: Final = 30 * 60
# A session's last-seen time is written at most this often, not on every page: a page load
# then costs one indexed read, not a write. The idle expiry is therefore exact to this much
# (a session may end up to this early, never late).
WEB_SESSION_TOUCH_S: Final = 60
# A form field longer than this is refused before it is looked at (a holder id, a username or
# an amount is short; a password is at most this long, so hashing it stays cheap).
WEB_MAX_FIELD_CHARS: Final = 256
# Money typed into a form: at most this much (1,000,000.00 yuan is beyond any campus amount;
# more is a typo), and at most this many characters before it is parsed.
WEB_AMOUNT_MAX_FEN: Final = 100_000_000
WEB_AMOUNT_MAX_CHARS: Final = 16
# The language chosen with ?lang= is remembered this long.
WEB_LANG_COOKIE_MAX_AGE_S: Final = 365 * 24 * 3600
# Browsers may keep /static/onecard.css this long; pages link it with ?v=<its hash>, so a new
# stylesheet is fetched at once after an upgrade.
WEB_STATIC_MAX_AGE_S: Final = 7 * 24 * 3600

# -- the operator console (/console: engine/web/console_*.py) ----------------------------------
# A console login refused because the whole engine is busy with logins (the global attempt
# bound) says "try again in" this long: the bucket refills within a second or two.
WEB_LOGIN_BUSY_RETRY_S: Final = 60
# Holder search answers at most this many rows per kind of match (id, name, card): a counter
# clerk refines a search; a list of thousands helps nobody and costs a page of that size.
CONSOLE_SEARCH_ROWS: Final = 50
# Latest transfers shown on a holder's page, and operator log entries per page.
CONSOLE_HOLDER_TRANSFERS: Final = 20
CONSOLE_LOG_PAGE: Final = 50
# Files uploaded at the console are read whole into memory: a provider's statement of one day
# (~100 bytes a top-up: 160,000 top-ups) and a month's subsidy list (~30 bytes a row, 40,000
# students in well under 2 MiB; the preview carries it back in a hidden field, base64, so the
# confirm's body is 4/3 of it and must stay under MAX_BODY_BYTES). A larger statement goes
# through ``onecard reconcile``.
CONSOLE_STATEMENT_MAX_BYTES: Final = 16 * 1024 * 1024
CONSOLE_SUBSIDY_MAX_BYTES: Final = 2 * 1024 * 1024
# Refused subsidy rows listed in the preview (all are counted): a wrong ledger makes every
# row refused, and 40,000 rows of the same refusal help nobody.
CONSOLE_PREVIEW_REFUSED_ROWS: Final = 200

# -- operations: backups and bounded growth ---------------------------------------------------
# A WAL segment is archived when full (16 MB) or this long after its first write, whichever is
# first: the most a quiet campus loses if the disk holding pgdata dies but the archive lives.
# Each forced segment is a full 16 MB file, so a trickle of writes all night costs at most
# 288 segments (4.5 GB) a day of archive; shorter would multiply that.
EMBEDDED_ARCHIVE_TIMEOUT_S: Final = 300
# pg_basebackup and pg_verifybackup together, and a restore's recovery: generous, since both
# grow with the database (measured: see the README), but never forever.
BACKUP_TIMEOUT_S: Final = 6 * 3600.0
RESTORE_TIMEOUT_S: Final = 6 * 3600.0
# Remembered terminal answers are kept this long (ONECARD_ANSWER_RETENTION_DAYS): a
# retransmission or a reversal comes within minutes; 35 days cover a monthly reconciliation.
ANSWER_RETENTION_DAYS: Final = 35
# Web sessions not seen for this long are deleted (they expired after WEB_SESSION_IDLE_S).
SESSION_RETENTION_DAYS: Final = 1
# Failed logins and wrong PINs older than this are deleted: a lockout lasts 15 minutes and a
# PIN count one campus day, so a week keeps what an investigation of an attack needs.
ATTEMPT_RETENTION_DAYS: Final = 7
# Old rows are deleted this many per statement, with a pause in between, so the pruner never
# holds many row locks or long transactions beside the hot path.
RETENTION_BATCH_ROWS: Final = 1000
RETENTION_BATCH_PAUSE_S: Final = 0.05
RETENTION_INTERVAL_S: Final = 3600.0  # how often the pruner looks for rows past their window
# -- the terminal simulator (onecard simulate, terminals/simulator/) ----------------------------
# A tool beside the engine, bounded here all the same: one place holds every number that caps
# work. The traffic mix (the share of meals, reversals, outages...) is the simulation's shape,
# not a bound: it stays with the driver.
SIMULATOR_MIN_TERMINALS: Final = 4  # one of each kind: till, water valve, kiosk, meter
SIMULATOR_MAX_WORKERS: Final = 64  # processes driving the terminals
SIMULATOR_SETUP_CONCURRENCY: Final = 16  # registry calls in flight while building the campus
SIMULATOR_SIGN_ON_CONCURRENCY: Final = 64  # terminals connecting and signing on at once
SIMULATOR_FUNDING_CHUNK: Final = 4096  # top-up transfers per batcher request
SIMULATOR_CLIENT_TIMEOUT_S: Final = 10.0  # a terminal waits this long for an answer
# A request answered 96, or not at all, is retransmitted this often, the pause doubling from
# the first backoff up to the second: a run ends even when the gateway never answers.
SIMULATOR_MAX_ATTEMPTS: Final = 12
SIMULATOR_RETRY_BACKOFF_S: Final = 0.05
SIMULATOR_RETRY_BACKOFF_MAX_S: Final = 1.0
SIMULATOR_MAX_PROBLEMS: Final = 50  # problems kept for the report
# -- the campus (engine/campus/) ------------------------------------------------------------------
DEFAULT_HOLD_TIMEOUT_S: Final = 1800  # a shower is paid or released within half an hour
MAX_CACHED_TERMINALS: Final = 65_536  # terminals never change once registered
MAX_CACHED_CARDS: Final = 262_144  # card -> holder never changes either
UNDO_ATTEMPTS: Final = 3  # a reversal racing a completion re-reads and tries again
# A payment refused for funds its read had seen (another engine process spent from the purses
# in between: the holder lock is per process) reads again and tries again this often in all.
PAYMENT_ATTEMPTS: Final = 3
# Today's spending of a holder is re-read from the ledger at least this often, so spending
# through another engine process (whose commits this one does not hear) counts within this long.
SPEND_MEMORY_TTL_S: Final = 5.0
MAX_REMEMBERED_HOLDERS: Final = 262_144  # holders whose spending today is remembered
SUBSIDY_CHUNK: Final = 1000  # subsidy grants / clear-downs per batcher submission

# -- read coalescing (engine/db/coalesce.py) ------------------------------------------------------
# Requests one shared read statement serves at most (rows of its unnest arrays): bounds the
# statement's size and how long the requests behind it wait for the next one.
COALESCE_MAX_BATCH: Final = 2048
# A coalescer whose queue ran dry keeps its connection this long for the next request before
# it gives it back (giving it back costs a reset round trip; under load work comes every ms).
COALESCE_LINGER_S: Final = 0.05

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

# -- self-service pages (/self: engine/selfservice, engine/web/self_*) ------------------------
# Low-balance warnings on the home page (issue 13): the purses together under 20.00 yuan (a
# few days of meals), a room's electricity under 10.00 yuan (a few days of a dorm's use).
# Defaults; ONECARD_SELF_LOW_BALANCE_FEN and ONECARD_SELF_LOW_ROOM_FEN override them.
SELF_LOW_BALANCE_FEN: Final = 2_000
SELF_LOW_ROOM_FEN: Final = 1_000
# Contract §7: a statement page lists this many transfers.
SELF_STATEMENT_PAGE: Final = 20
# Page loads that share one read statement (coalesced like the terminal path's reads): a
# statement of a thousand holders' rows is still a few milliseconds.
SELF_COALESCE_MAX_BATCH: Final = 1024
# A holder id longer than the holders table's CHECK allows cannot exist: not looked up.
SELF_HOLDER_ID_MAX_CHARS: Final = 64
# Holder id -> (ledger, purses) never changes; this many are remembered per process (a
# campus has tens of thousands of holders; beyond the bound the oldest are forgotten).
SELF_MAX_CACHED_HOLDERS: Final = 262_144

# Labelled latency histograms kept at hand by the HTTP timing middleware (per method, route
# template, status); a client sending odd methods cannot grow the cache past this.
HTTP_TIMING_CHILDREN: Final = 512
