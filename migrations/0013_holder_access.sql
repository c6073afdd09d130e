-- Holders' own access (contract §6/§7): activation codes and passwords, failed-login counters,
-- and which room a holder lives in. Keyed by the holder's ledger like the holders table.

CREATE TABLE holder_credentials (
    ledger          integer NOT NULL,
    holder_id       text    NOT NULL,
    -- Argon2id hashes only: the password, and the one-time activation code (8 digits; a fast
    -- hash of so few possibilities would give it away to whoever reads this table)
    password_hash   text,
    code_hash       text,
    code_expires_at bigint,  -- wall clock, ns; the code is void after it, or once used
    updated_at      bigint  NOT NULL,
    PRIMARY KEY (ledger, holder_id),
    FOREIGN KEY (ledger, holder_id) REFERENCES holders (ledger, id)
);

-- Failed password or code tries per subject (a holder id, or an operator under ledger 0):
-- five within the window lock the subject until `locked_until` (engine/access/lockout.py).
CREATE TABLE login_failures (
    ledger       integer NOT NULL,
    realm        text    NOT NULL CHECK (realm IN ('holder', 'operator')),
    subject      text    NOT NULL,
    failures     integer NOT NULL,
    window_start bigint  NOT NULL,
    locked_until bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (ledger, realm, subject)
);

-- A holder lives in at most one room at a time: the key is the holder.
CREATE TABLE room_residents (
    ledger     integer NOT NULL,
    holder_id  text    NOT NULL,
    room_id    text    NOT NULL,
    created_at bigint  NOT NULL,
    PRIMARY KEY (ledger, holder_id),
    FOREIGN KEY (ledger, holder_id) REFERENCES holders (ledger, id),
    FOREIGN KEY (ledger, room_id) REFERENCES rooms (ledger, room_id)
);
CREATE INDEX room_residents_room ON room_residents (ledger, room_id);
