-- The self-service pages (/self, contract §7): a holder's own daily limit, and finding a
-- holder by the id typed at the login (no ledger is typed).

-- A holder's own daily limit (fen), set at /self/limit and removed by an empty field. It only
-- ever tightens the card office's `cards.daily_limit`: every payment checks the lower of the
-- two (engine/campus: the card state read). It belongs to the holder, not to a card, so a
-- replacement card keeps it. No row: no limit of the holder's own.
CREATE TABLE holder_limits (
    ledger      integer NOT NULL,
    holder_id   text    NOT NULL,
    daily_limit bigint  NOT NULL CHECK (daily_limit >= 0),
    updated_at  bigint  NOT NULL,  -- wall clock, ns
    PRIMARY KEY (ledger, holder_id),
    FOREIGN KEY (ledger, holder_id) REFERENCES holders (ledger, id)
);

-- Holders are keyed (ledger, id); a holder logging in names only the id.
CREATE INDEX holders_id ON holders (id);
