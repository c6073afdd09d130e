-- The ledger: accounts, append-only transfers, holds, per-ledger clock and audit chain,
-- balance snapshots. Every table carries `ledger` and every key includes it (Citus-ready:
-- distribute by ledger, co-locate everything).

CREATE TABLE ledgers (
    ledger          integer PRIMARY KEY,
    -- the per-ledger clock: engine timestamps (ns) are strictly increasing within a ledger
    last_timestamp  bigint  NOT NULL DEFAULT 0,
    -- head of the audit hash chain over this ledger's transfers (sha256, hex)
    chain_head      text    NOT NULL DEFAULT repeat('0', 64)
);

CREATE TABLE accounts (
    ledger          integer  NOT NULL,
    id              bigint   NOT NULL CHECK (id > 0),
    kind            text     NOT NULL CHECK (kind IN ('purse', 'subsidy', 'room', 'merchant',
                                     'utility', 'suspense', 'clearing', 'fund')),
    code            integer  NOT NULL,
    flags           integer  NOT NULL,
    holder_id       text,
    name            text,
    debits_posted   bigint   NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_posted  bigint   NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    debits_pending  bigint   NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    credits_pending bigint   NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    created_at      bigint   NOT NULL,
    PRIMARY KEY (id, ledger)
);
CREATE INDEX accounts_holder ON accounts (ledger, holder_id) WHERE holder_id IS NOT NULL;

CREATE TABLE transfers (
    ledger            integer NOT NULL,
    id                uuid    NOT NULL,
    debit_account_id  bigint  NOT NULL,
    credit_account_id bigint  NOT NULL,
    amount            bigint  NOT NULL CHECK (amount >= 0),
    pending_id        uuid,
    code              integer NOT NULL,
    flags             integer NOT NULL,
    timeout_s         integer NOT NULL DEFAULT 0,
    user_data         text,
    timestamp         bigint  NOT NULL,
    PRIMARY KEY (id, ledger)
);
CREATE UNIQUE INDEX transfers_timestamp ON transfers (ledger, timestamp);
CREATE INDEX transfers_debit ON transfers (ledger, debit_account_id, timestamp);
CREATE INDEX transfers_credit ON transfers (ledger, credit_account_id, timestamp);

-- Transfers are facts: never updated, never deleted.
CREATE FUNCTION transfers_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'transfers are append-only (% refused)', TG_OP;
END $$;
CREATE TRIGGER transfers_append_only BEFORE UPDATE OR DELETE ON transfers
    FOR EACH ROW EXECUTE FUNCTION transfers_append_only();
CREATE TRIGGER transfers_no_truncate BEFORE TRUNCATE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION transfers_append_only();

-- The mutable side of pending transfers (holds).
CREATE TABLE holds (
    ledger            integer NOT NULL,
    id                uuid    NOT NULL,
    debit_account_id  bigint  NOT NULL,
    credit_account_id bigint  NOT NULL,
    amount            bigint  NOT NULL,
    code              integer NOT NULL,
    expires_at        bigint  NOT NULL,  -- 0 = never
    state             text    NOT NULL CHECK (state IN ('pending', 'settled', 'voided', 'expired')),
    created_at        bigint  NOT NULL,
    resolved_at       bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (id, ledger)
);
CREATE INDEX holds_due ON holds (ledger, expires_at) WHERE state = 'pending' AND expires_at > 0;
-- as-of balances: holds released after a snapshot, per account
CREATE INDEX holds_debit_resolved ON holds (ledger, debit_account_id, resolved_at)
    WHERE resolved_at > 0;
CREATE INDEX holds_credit_resolved ON holds (ledger, credit_account_id, resolved_at)
    WHERE resolved_at > 0;

-- One row per committed batch: the audit hash chain. `head` = sha256(prev_head || batch).
CREATE TABLE audit_batches (
    ledger          integer NOT NULL,
    first_timestamp bigint  NOT NULL,
    last_timestamp  bigint  NOT NULL,
    transfer_count  integer NOT NULL,
    prev_head       text    NOT NULL,
    head            text    NOT NULL,
    PRIMARY KEY (ledger, last_timestamp)
);

-- Every account's four balance fields at a cut-off engine timestamp.
CREATE TABLE balance_snapshots (
    ledger          integer NOT NULL,
    account_id      bigint  NOT NULL,
    timestamp       bigint  NOT NULL,
    debits_posted   bigint  NOT NULL,
    credits_posted  bigint  NOT NULL,
    debits_pending  bigint  NOT NULL,
    credits_pending bigint  NOT NULL,
    PRIMARY KEY (ledger, account_id, timestamp)
);
CREATE TABLE snapshot_runs (
    ledger     integer NOT NULL,
    timestamp  bigint  NOT NULL,
    accounts   integer NOT NULL,
    taken_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (ledger, timestamp)
);
