-- sluice: the loader's least-privilege ClickHouse user. Run it as a user with access management
-- (the server's admin), after replacing the three names below:
--   `app`              the loader's database: clickhouse.database, by default the source name
--   `sluice_loader`    the user (clickhouse.user)
--   'change-me'        its password (clickhouse.password or clickhouse.password_file)
--
--   sed -e 's/\bapp\b/shop/g' -e "s/change-me/$PASSWORD/" sql/clickhouse/setup.sql |
--       clickhouse-client --user admin --ask-password --multiquery
--
-- The user may create, fill, alter, swap (resync) and read tables in its own database and
-- nothing else: no other database, no access management, no SYSTEM commands, no table engine
-- but ReplacingMergeTree. Each grant is used:
--   CREATE DATABASE  the loader creates its database at start (IF NOT EXISTS: checked even when
--                    the database exists; pre-create it and the grant is still needed)
--   CREATE TABLE     target tables, the positions table, resync shadows
--   DROP TABLE       a resync drops the old table after EXCHANGE TABLES
--   ALTER TABLE      columns added by a Postgres schema change
--   INSERT, SELECT   rows and positions; `sluice-loader verify` and `status` only read
--   TRUNCATE         a TRUNCATE in Postgres
-- Without one of them the loader stops with ClickHouse's ACCESS_DENIED message (code 497) naming
-- the missing grant; it does not retry or resync.
--
-- deploy/clickhouse/sluice-loader.xml defines the same user in a users.d file instead (what
-- docker-compose.yml uses); the test stack (scripts/clickhouse-server.py) grants the same on
-- `sluice_*`, and integration/tests/least_privilege.rs checks that all three agree.
CREATE USER IF NOT EXISTS sluice_loader IDENTIFIED WITH sha256_password BY 'change-me';
GRANT CREATE DATABASE, CREATE TABLE, DROP TABLE, ALTER TABLE, INSERT, SELECT, TRUNCATE ON app.* TO sluice_loader;
GRANT TABLE ENGINE ON ReplacingMergeTree TO sluice_loader;
