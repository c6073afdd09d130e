"""Prometheus metrics (``onecard_`` prefix). One registry per process, served at /metrics."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY: Final = CollectorRegistry(auto_describe=True)

TRANSFERS: Final = Counter(
    "onecard_transfers_total", "Transfers answered, by status.", ["status"], registry=REGISTRY
)
ACCOUNTS: Final = Counter(
    "onecard_accounts_total",
    "Account creations answered, by status.",
    ["status"],
    registry=REGISTRY,
)
BATCH_SIZE: Final = Histogram(
    "onecard_batch_transfers",
    "Transfers per committed batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8190),
    registry=REGISTRY,
)
COMMIT_SECONDS: Final = Histogram(
    "onecard_batch_commit_seconds",
    "Time to apply and commit one batch.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
BATCH_RETRIES: Final = Counter(
    "onecard_batch_retries_total", "Batches retried after a database fault.", registry=REGISTRY
)
SPECULATION: Final = Counter(
    "onecard_batch_speculation_total",
    "Batches prepared ahead of their commit, by whether the ledger was still as prepared "
    "(held) or had moved so the batch took the locked path (missed).",
    ["outcome"],
    registry=REGISTRY,
)
QUEUE_DEPTH: Final = Gauge(
    "onecard_queue_transfers", "Transfers waiting for the committer.", registry=REGISTRY
)
OVERLOADED: Final = Counter(
    "onecard_overloaded_total",
    "Submissions refused because the queue was full.",
    registry=REGISTRY,
)
HOLDS_EXPIRED: Final = Counter(
    "onecard_holds_expired_total", "Holds released by their timeout.", registry=REGISTRY
)
HTTP_SECONDS: Final = Histogram(
    "onecard_http_request_seconds",
    "HTTP request latency by route and status.",
    ["method", "route", "status"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
    registry=REGISTRY,
)
DB_POOL_SIZE: Final = Gauge(
    "onecard_db_pool_connections", "Open database connections.", registry=REGISTRY
)
DB_POOL_IDLE: Final = Gauge(
    "onecard_db_pool_idle_connections", "Idle database connections.", registry=REGISTRY
)
PRUNED_ROWS: Final = Counter(
    "onecard_pruned_rows_total",
    "Rows deleted by the retention pruner once past their window, by table.",
    ["table"],
    registry=REGISTRY,
)
PRUNE_LAST_PASS: Final = Gauge(
    "onecard_prune_last_pass_timestamp_seconds",
    "When the retention pruner last finished a pass over every rule (Unix time).",
    registry=REGISTRY,
)
