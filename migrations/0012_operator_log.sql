-- The operator log (contract §6): every write made by an operator or an API key, append-only
-- and hash-chained like the audit chain: hash = sha256(prev_hash || canonical(entry))
-- (engine/access/oplog.py), so a changed, deleted or inserted row is found by `onecard verify`.
--
-- One chain for the installation, kept under ledger 0: the head row is the chain's clock (ids
-- are taken from it, never from a sequence), and every append locks it. Under Citus both tables
-- are distributed by `ledger` like everything else, so the whole chain lives on the shard of
-- ledger 0 and an append is a single-shard transaction; per-campus chains would only need other
-- head rows.

CREATE TABLE operator_log_heads (
    ledger  integer PRIMARY KEY,
    last_id bigint  NOT NULL DEFAULT 0,
    head    text    NOT NULL DEFAULT repeat('0', 64)
);
INSERT INTO operator_log_heads (ledger) VALUES (0);

CREATE TABLE operator_log (
    ledger    integer NOT NULL,
    id        bigint  NOT NULL CHECK (id > 0),
    at        bigint  NOT NULL,  -- wall clock, ns
    actor     text    NOT NULL,  -- username or key name
    role      text    NOT NULL,
    action    text    NOT NULL,  -- e.g. "POST /v1/cards/{card_no}/report-lost"
    target    text    NOT NULL,  -- what it acted on (ids, never a secret)
    outcome   text    NOT NULL,  -- the answer's status
    prev_hash text    NOT NULL,
    hash      text    NOT NULL,
    PRIMARY KEY (ledger, id)
);

CREATE FUNCTION operator_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the operator log is append-only (% refused)', TG_OP;
END $$;
CREATE TRIGGER operator_log_append_only BEFORE UPDATE OR DELETE ON operator_log
    FOR EACH ROW EXECUTE FUNCTION operator_log_append_only();
CREATE TRIGGER operator_log_no_truncate BEFORE TRUNCATE ON operator_log
    FOR EACH STATEMENT EXECUTE FUNCTION operator_log_append_only();
