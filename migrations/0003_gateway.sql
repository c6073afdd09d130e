-- Terminal gateway: the remembered answer to every financial request message (contract §5
-- idempotency). A retransmission (same terminal id + STAN + field 7) must get the identical
-- answer, same RRN and same field 54, even after a restart, so the answer is stored before it
-- is sent. Keyed by ledger first like every table (Citus-ready).

CREATE TABLE gateway_responses (
    ledger          integer     NOT NULL,
    -- uuid5(gateway namespace, terminal id + STAN + field 7): the request's idempotency key
    key             uuid        NOT NULL,
    terminal_id     text        NOT NULL,
    -- sha256 of the request's business content: same key + other content answers 94
    request_digest  bytea       NOT NULL,
    -- field 37, unique per ledger so an operator can find a transaction by its RRN
    rrn             text        NOT NULL,
    -- the answer without its MAC (msgspec JSON of terminals.iso8583.Message)
    response        bytea       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (ledger, key)
);
CREATE UNIQUE INDEX gateway_responses_rrn ON gateway_responses (ledger, rrn);
-- for a future retention job (retransmissions only matter for minutes)
CREATE INDEX gateway_responses_created ON gateway_responses (ledger, created_at);
