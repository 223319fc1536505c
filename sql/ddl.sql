-- DDL replication (src/ddl.rs, docs/architecture.md "DDL"): the event triggers that record
-- schema changes in replicated schemas into the transaction's change stream, make new tables
-- join their herd, and forget dropped tables. ENABLE ALWAYS: in replica mode (apply sessions)
-- they act only while a replicated DDL command runs, to let new tables join the herd there too.
CREATE FUNCTION rbucardo.ddl_trigger() RETURNS event_trigger
    LANGUAGE c AS 'MODULE_PATHNAME', 'rbucardo_ddl_trigger';
COMMENT ON FUNCTION rbucardo.ddl_trigger() IS 'rbucardo DDL capture; event triggers rbucardo_ddl and rbucardo_ddl_drop';

CREATE EVENT TRIGGER rbucardo_ddl ON ddl_command_end EXECUTE FUNCTION rbucardo.ddl_trigger();
ALTER EVENT TRIGGER rbucardo_ddl ENABLE ALWAYS;
CREATE EVENT TRIGGER rbucardo_ddl_drop ON sql_drop EXECUTE FUNCTION rbucardo.ddl_trigger();
ALTER EVENT TRIGGER rbucardo_ddl_drop ENABLE ALWAYS;

REVOKE ALL ON FUNCTION rbucardo.ddl_trigger() FROM PUBLIC;
