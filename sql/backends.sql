-- Named backends: the servers of this foreign-data wrapper, as postgres_fdw and dblink keep
-- their connection settings. Its validator checks each server's options at CREATE and ALTER
-- SERVER; secrets may live in a USER MAPPING instead, readable only as PostgreSQL allows for
-- mappings. No handler: a broadcaster server holds no foreign tables. Only superusers may
-- create servers unless granted USAGE on the wrapper; an event names a server it may use
-- (USAGE on the server).
CREATE FOREIGN DATA WRAPPER broadcaster VALIDATOR @extschema@.broadcaster_fdw_validator;
COMMENT ON FOREIGN DATA WRAPPER broadcaster IS
    'Named broadcaster backends: CREATE SERVER name FOREIGN DATA WRAPPER broadcaster OPTIONS (backend ''redis'', url ''...'')';
