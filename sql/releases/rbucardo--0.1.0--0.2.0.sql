-- rbucardo 0.1.0 -> 0.2.0 (ALTER EXTENSION rbucardo UPDATE).
--
-- 0.1.0 is the first release: rbucardo--0.1.0.sql beside this file is its install script as
-- cargo pgrx generated it, kept so that a 0.1.0 database can be created and updated in the
-- test (scripts/test-package.sh). Until 0.2.0 is released, every change to the schema (sql/,
-- #[pg_extern] signatures, extension_sql!) must be written here too: the test fails, with a
-- diff, when a 0.1.0 database updated with this script differs from a fresh 0.2.0 install.
--
-- Nothing in the schema differs yet: 0.2.0 changes only the library.

\echo Use "ALTER EXTENSION rbucardo UPDATE" to load this file. \quit
