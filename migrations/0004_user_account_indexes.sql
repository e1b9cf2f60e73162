-- 0004: index the (username, account) pairs of open jobs and charged runs.
--
-- `/stats?username=` answers with the user's accounts, found from their open
-- preallocations and charged runs. With the account in the index, both lookups read the
-- index alone instead of one table row per job (measured on a 10k-user ledger: the whole
-- answer 0.38 ms -> 0.28 ms).
--
-- jobs_preallocations_username (username + the amounts) served the per-user sums that
-- migration 0003 replaced by running totals; nothing reads the amounts through it any more,
-- so it is replaced rather than joined by a second index: the plugin's insert and the
-- charge's delete maintain the same number of indexes as before.
BEGIN IMMEDIATE;

DROP INDEX IF EXISTS jobs_preallocations_username;
CREATE INDEX IF NOT EXISTS jobs_preallocations_username_account
    ON jobs_preallocations(username, account);
CREATE INDEX IF NOT EXISTS charges_username_account ON charges(username, account);

PRAGMA user_version = 4;
COMMIT;
