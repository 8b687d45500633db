-- sluice: Postgres set-up for one source database. Run it as a superuser (or the owner of the
-- tables) connected to the source database:
--
--   psql -v ON_ERROR_STOP=1 -d DBNAME -f sql/postgres/setup.sql \
--        -v tables=public.orders,public.customers [-v publication=sluice] [-v schema=public] \
--        [-v role=sluice] [-v password=SECRET]
--
-- Every variable is optional: `tables` defaults to every table in `schema` (FOR TABLES IN SCHEMA
-- on Postgres 15+: tables created there later are published too; Postgres 13 and 14 have no such
-- publication, so there it lists the schema's tables as they are now, and a table created later
-- must be added with ALTER PUBLICATION ... ADD TABLE). With `tables`, the role may read
-- exactly those tables; without, every table of `schema`, now and created later; `password` defaults to the
-- environment variable SLUICE_ROLE_PASSWORD of psql (docker-compose.yml uses that), else the
-- password is left unset (set it with ALTER ROLE, or use certificate authentication). Running the file
-- again changes nothing that exists already (role, publication); it only re-applies the grants.
--
-- Prerequisites (postgresql.conf; wal_level needs a restart):
--   wal_level = logical
--   max_replication_slots >= 1 per replicator (plus what else uses slots)
--   max_wal_senders       >= 1 per replicator (plus physical standbys)
--   max_slot_wal_keep_size = 50GB   -- recommended: caps the WAL a stalled slot can pin; a slot
--                                   -- past the cap is invalidated and sluice resyncs every table
-- and one pg_hba.conf line for the role and the source database, e.g.
--   hostssl  DBNAME  sluice  10.0.0.0/8  scram-sha-256
-- It covers both of sluice's connections: the SQL one (catalog, COPY) and the logical replication
-- one (`replication=database` connections match the database name like ordinary ones). Do NOT add
-- a `replication` keyword line for the role: that keyword matches *physical* replication, and with
-- the REPLICATION attribute it would let the role copy the whole cluster (pg_basebackup), every
-- database and table included.

\set ON_ERROR_STOP 1
\if :{?publication} \else \set publication sluice \endif
\if :{?schema} \else \set schema public \endif
\if :{?role} \else \set role sluice \endif
\if :{?password} \else \getenv password SLUICE_ROLE_PASSWORD \endif

SELECT current_setting('wal_level') <> 'logical' AS wal_not_logical \gset
\if :wal_not_logical
\warn 'wal_level is not logical: run ALTER SYSTEM SET wal_level = logical; and restart Postgres'
\endif

-- 1. A least-privilege role: LOGIN + REPLICATION (create/drop its slot, stream WAL), and SELECT
--    on the published tables for the initial snapshot and resyncs. No superuser, no ownership.
SELECT NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') AS create_role \gset
\if :create_role
CREATE ROLE :"role" WITH LOGIN REPLICATION;
\else
ALTER ROLE :"role" WITH LOGIN REPLICATION;
\endif
\if :{?password}
ALTER ROLE :"role" PASSWORD :'password';
\endif

GRANT CONNECT ON DATABASE :"DBNAME" TO :"role";
\if :{?tables}
-- Exactly the listed tables (and USAGE on their schemas); nothing else in the database.
SELECT string_agg(DISTINCT format('%I', n.nspname), ', ') AS table_schemas
FROM unnest(string_to_array(:'tables', ',')) AS t(name)
JOIN pg_class c ON c.oid = trim(t.name)::regclass
JOIN pg_namespace n ON n.oid = c.relnamespace \gset
GRANT USAGE ON SCHEMA :table_schemas TO :"role";
GRANT SELECT ON TABLE :tables TO :"role";
\else
GRANT USAGE ON SCHEMA :"schema" TO :"role";
GRANT SELECT ON ALL TABLES IN SCHEMA :"schema" TO :"role";
-- Tables created later in the schema (by the role running this file) are readable too: the
-- publication publishes them. Tables created by another role need
-- `ALTER DEFAULT PRIVILEGES FOR ROLE that_role ...` as well.
ALTER DEFAULT PRIVILEGES IN SCHEMA :"schema" GRANT SELECT ON TABLES TO :"role";
\endif

-- 2. The publication: which tables are replicated. FOR TABLE needs ownership of the tables (or
--    superuser); FOR ALL TABLES / FOR TABLES IN SCHEMA need superuser. sluice can also create it
--    itself from `postgres.tables` in its config, but then the sluice role must own the tables
--    and have CREATE on the database, so creating it here is the least-privilege way.
--    Add tables later with: ALTER PUBLICATION sluice ADD TABLE public.new_table;
--    Partitioned tables: add the parent and set WITH (publish_via_partition_root = true) so
--    changes arrive under the parent's name.
SELECT NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = :'publication') AS create_publication,
       current_setting('server_version_num')::int >= 150000 AS has_tables_in_schema \gset
\if :create_publication
\if :{?tables}
CREATE PUBLICATION :"publication" FOR TABLE :tables;
\elif :has_tables_in_schema
CREATE PUBLICATION :"publication" FOR TABLES IN SCHEMA :"schema";
\else
-- Postgres 13 and 14: the schema's tables (and partitioned tables) as they are now.
SELECT string_agg(format('%I.%I', n.nspname, c.relname), ', ' ORDER BY c.relname) AS schema_tables
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = :'schema' AND c.relkind IN ('r', 'p') AND NOT c.relispartition \gset
\if :{?schema_tables}
CREATE PUBLICATION :"publication" FOR TABLE :schema_tables;
\else
CREATE PUBLICATION :"publication";
\endif
\warn 'Postgres before 15 has no FOR TABLES IN SCHEMA: the publication lists the schema''s tables of now; add tables created later with ALTER PUBLICATION ... ADD TABLE'
\endif
\endif

-- 3. Replica identity. sluice keys rows by the replica identity and skips (with an error line
--    and sluice_replicator_table_errors{table} = 1) any published table without a usable one:
--      DEFAULT with a primary key      fine (the usual case)
--      USING INDEX unique_not_null_idx fine: that index's columns are the key
--      FULL                            fine: the primary key if any, else every column (slow,
--                                      large WAL; use only for tables without any key)
--      NOTHING, or DEFAULT without PK  not replicable
--    Fix a table with:  ALTER TABLE t REPLICA IDENTITY FULL;  (or add a primary key)
--    The query below lists published tables that would be skipped.
SELECT format('%I.%I', pt.schemaname, pt.tablename) AS "published table without a usable replica identity"
FROM pg_publication_tables pt
JOIN pg_namespace n ON n.nspname = pt.schemaname
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
WHERE pt.pubname = :'publication'
  AND (c.relreplident = 'n'
       OR (c.relreplident = 'd' AND NOT EXISTS (
             SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)));
