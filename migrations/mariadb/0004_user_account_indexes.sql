-- 0004 (MariaDB): index the (username, account) pairs of open jobs and charged runs, as
-- migrations/0004_user_account_indexes.sql. The new index is created before the old one is
-- dropped: InnoDB needs an index starting with username for the foreign key to users.

CREATE INDEX IF NOT EXISTS jobs_preallocations_username_account
    ON jobs_preallocations (username, account);
DROP INDEX IF EXISTS jobs_preallocations_username ON jobs_preallocations;
CREATE INDEX IF NOT EXISTS charges_username_account ON charges (username, account);

UPDATE schema_version SET version = 4 WHERE id = 1 AND version < 4;
