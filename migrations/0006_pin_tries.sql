-- Wrong PINs per card and campus-local day (contract §5 v4): after 5 in a day every PIN check
-- of the card answers 75 until the next day or until the card office resets the count
-- (POST /v1/cards/{card_no}/pin-tries/reset deletes the card's rows). A row is written only
-- by a wrong PIN; the PIN itself is never stored here. Keyed by ledger first (Citus-ready).

CREATE TABLE pin_tries (
    ledger     integer NOT NULL,
    card_no    text    NOT NULL,
    day        date    NOT NULL,  -- the campus-local day (ONECARD_TZ) of the attempts
    failures   bigint  NOT NULL CHECK (failures >= 0),
    updated_at bigint  NOT NULL,  -- wall clock, ns: the last wrong PIN
    PRIMARY KEY (ledger, card_no, day),
    FOREIGN KEY (ledger, card_no) REFERENCES cards (ledger, card_no)
);
