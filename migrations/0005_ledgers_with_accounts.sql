-- Ledgers exist only where accounts do (issue 18, finding 6).

-- The hold expirer asks one question a second for all ledgers at once: which have a pending
-- hold past its timeout? An index range scan over the holds already due, however many ledgers
-- there are (holds_due, per ledger, stays for the expiry batch of one ledger).
CREATE INDEX holds_expiry ON holds (expires_at, ledger) WHERE state = 'pending' AND expires_at > 0;

-- A transfer used to create its ledger's clock row even when the ledger had no accounts (every
-- such transfer failed): rows that nothing can ever use, each taken by the daily snapshot.
-- Clock rows are now created with a ledger's first account only; drop the others.
DELETE FROM snapshot_runs r WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.ledger = r.ledger);
DELETE FROM ledgers l WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.ledger = l.ledger);

-- A ledger's subsidy fund is created with its holders (engine/campus.py, Campus.create_holder),
-- no longer by the first subsidy paid from it. Ledgers whose holders predate that get theirs
-- here: kind fund, code 90 (FUND_CODE), no flags, with the id engine.campus.fund_account_id
-- derives: the first 8 bytes of sha256('onecard/<ledger>/fund/subsidy-fund') as a big-endian
-- integer, top bit cleared, 0 taken as 1.
INSERT INTO accounts (ledger, id, kind, code, flags, name, created_at)
SELECT f.ledger, f.id, 'fund', 90, 0, 'subsidy fund',
       (extract(epoch FROM now()) * 1000000000)::bigint
FROM (
    SELECT h.ledger,
           greatest(('x' || encode(substr(sha256(convert_to(
               'onecard/' || h.ledger || '/fund/subsidy-fund', 'UTF8')), 1, 8), 'hex'))::bit(64)::bigint
               & 9223372036854775807, 1) AS id
    FROM (SELECT DISTINCT ledger FROM holders) h
) f
WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = f.id);
