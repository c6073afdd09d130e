-- Secrets at rest: card PINs and terminal MAC keys are stored sealed (AES-256-GCM) under a key
-- kept outside the database (DATA_DIR/secret.key or ONECARD_SECRET_KEY; engine/access/secrets.py),
-- so a dump of the database alone reveals neither. Each sealed value names its key (a key id)
-- and is bound to its row (card number / terminal id as associated data), so a value copied to
-- another row does not open.
--
-- The clear columns stay for rows written before this migration: the first start with a key
-- seals them and sets the clear column to NULL (engine.access.secrets.seal_clear_values).
ALTER TABLE cards ADD COLUMN pin_enc bytea;
ALTER TABLE terminals ADD COLUMN mac_key_enc bytea;
ALTER TABLE terminals ALTER COLUMN mac_key DROP NOT NULL;
ALTER TABLE terminals ADD CONSTRAINT terminals_has_key
    CHECK (mac_key IS NOT NULL OR mac_key_enc IS NOT NULL);
