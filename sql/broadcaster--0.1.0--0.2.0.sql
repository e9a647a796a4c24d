-- broadcaster 0.1.0 -> 0.2.0. Hand-written, never edited after release. Runs with events in
-- flight: no table is rewritten, no row is touched but the one broadcaster_origin gets.
-- Grants carry over. What is re-created (broadcaster_relays, broadcaster_publish(json)) gets the
-- grants 0.1.0's had, and the two new overloads of broadcaster_publish those of the json one:
-- a producer allowed to publish before the update is after it, whichever overload a call
-- resolves to. Each is first revoked from PUBLIC, as in a fresh install (recorded as the
-- extension's initial privilege), then given its grants by a catalog update that is not: so
-- pg_dump keeps them as the user's own, as it does the grants of a fresh install.

-- 0.1.0's control file named the library '$libdir/broadcaster'; 0.2.0's names it 'broadcaster',
-- found through dynamic_library_path (PostgreSQL 18's extension_control_path installs, whose
-- pg_upgrade check LOADs each function's library by that name). The functions 0.1.0 made and
-- this script does not re-create are re-pointed: same definitions, grants kept.
CREATE OR REPLACE FUNCTION @extschema@.broadcaster_default_source() RETURNS TEXT
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'broadcaster_default_source_wrapper';
CREATE OR REPLACE FUNCTION @extschema@.broadcaster_health() RETURNS bool
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'broadcaster_health_wrapper';
CREATE OR REPLACE FUNCTION @extschema@.broadcaster_failures_cleared()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', 'broadcaster_failures_cleared_wrapper';
CREATE OR REPLACE FUNCTION @extschema@.broadcaster_outbox_accept()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', 'broadcaster_outbox_accept_wrapper';

-- Functions written in Rust that are new in 0.2.0.
CREATE FUNCTION @extschema@.broadcaster_replicated_row()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', 'broadcaster_replicated_row_wrapper';

-- broadcaster_relays() gains `backend`, `kind` and `state` (and a new C symbol: 0.1.0's, with 10
-- columns, stays in the library for databases not updated yet).
CREATE TEMPORARY TABLE broadcaster_upgrade_grants AS
    SELECT 'relays' AS what, proacl FROM pg_catalog.pg_proc
     WHERE oid OPERATOR(pg_catalog.=) '@extschema@.broadcaster_relays()'::pg_catalog.regprocedure
    UNION ALL
    SELECT 'publish', proacl FROM pg_catalog.pg_proc
     WHERE oid OPERATOR(pg_catalog.=)
           '@extschema@.broadcaster_publish(text, json, text, text, text, jsonb, text)'::pg_catalog.regprocedure
    UNION ALL
    SELECT 'status', proacl FROM pg_catalog.pg_proc
     WHERE oid OPERATOR(pg_catalog.=) '@extschema@.broadcaster_status()'::pg_catalog.regprocedure
    UNION ALL
    SELECT 'status view', relacl FROM pg_catalog.pg_class
     WHERE oid OPERATOR(pg_catalog.=) '@extschema@.broadcaster_status'::pg_catalog.regclass;

-- Named backends (foreign servers of the broadcaster wrapper): each event may name one. The index
-- is built under a lock that makes writers to the outbox wait while it is built: a scan of what
-- is pending, usually little.
ALTER TABLE @extschema@.broadcaster_outbox ADD COLUMN backend text;
ALTER TABLE @extschema@.broadcaster_failures ADD COLUMN backend text;
ALTER TABLE @extschema@.broadcaster_published ADD COLUMN backend text;
-- Each named backend's relay claims its events in seq order through this index. Partial: an
-- event for the default backend costs no entry here.
CREATE INDEX broadcaster_outbox_backend ON @extschema@.broadcaster_outbox (backend, seq)
    WHERE backend IS NOT NULL;

DROP VIEW @extschema@.broadcaster_status;
DROP FUNCTION @extschema@.broadcaster_status();
DROP FUNCTION @extschema@.broadcaster_relays();
CREATE FUNCTION @extschema@.broadcaster_relays() RETURNS TABLE (
	"database" oid,  /* pg_sys :: Oid */
	"backend" TEXT,  /* Option < String > */
	"kind" TEXT,  /* Option < String > */
	"pid" INT,  /* Option < i32 > */
	"state" TEXT,  /* & '_ str */
	"healthy" bool,  /* bool */
	"last_success_us" bigint,  /* Option < i64 > */
	"last_error" TEXT,  /* Option < String > */
	"last_error_us" bigint,  /* Option < i64 > */
	"published" bigint,  /* i64 */
	"failed" bigint,  /* i64 */
	"started_us" bigint,  /* Option < i64 > */
	"recent_rate" double precision,  /* f64 */
	"warning" TEXT  /* Option < String > */
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'broadcaster_relay_states_wrapper';
REVOKE ALL ON FUNCTION @extschema@.broadcaster_relays() FROM PUBLIC;

CREATE FUNCTION @extschema@.broadcaster_status(
    OUT database           name,
    OUT pid                integer,
    OUT state              text,
    OUT backend            text,
    OUT healthy            boolean,
    OUT last_success       timestamptz,
    OUT last_error         text,
    OUT last_error_at      timestamptz,
    OUT pending            bigint,
    OUT oldest_pending_age interval,
    OUT dead               bigint,
    OUT published          bigint,
    OUT failed             bigint,
    OUT published_per_second numeric,
    OUT kind               text,
    OUT warning            text
) RETURNS SETOF record
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH relays AS (
        SELECT r.*, d.datname
          FROM @extschema@.broadcaster_relays() r
          JOIN pg_database d ON d.oid = r.database),
    here AS (
        SELECT o.backend,
               count(*) FILTER (WHERE f.dead IS NOT TRUE) AS pending,
               now() - min(o.time) FILTER (WHERE f.dead IS NOT TRUE) AS oldest_pending_age,
               count(*) FILTER (WHERE f.dead) AS dead
          FROM @extschema@.broadcaster_outbox o
          LEFT JOIN @extschema@.broadcaster_failures f ON f.seq = o.seq
         GROUP BY o.backend)
    SELECT r.datname,
           r.pid,
           CASE WHEN r.backend IS NOT NULL AND r.datname = current_database()
                 AND NOT EXISTS (SELECT 1 FROM pg_foreign_server s
                                   JOIN pg_foreign_data_wrapper w ON w.oid = s.srvfdw
                                  WHERE w.fdwname = 'broadcaster' AND s.srvname = r.backend)
                THEN 'no server' ELSE r.state END,
           r.backend,
           r.healthy,
           pg_epoch + r.last_success_us * interval '1 microsecond',
           r.last_error,
           pg_epoch + r.last_error_us * interval '1 microsecond',
           CASE WHEN r.datname = current_database() THEN coalesce(h.pending, 0) END,
           h.oldest_pending_age,
           CASE WHEN r.datname = current_database() THEN coalesce(h.dead, 0) END,
           r.published,
           r.failed,
           round(r.recent_rate::numeric, 1),
           r.kind,
           r.warning
      FROM relays r
     CROSS JOIN (SELECT timestamptz '2000-01-01 00:00:00+00' AS pg_epoch) e
      LEFT JOIN here h
           ON r.datname = current_database() AND h.backend IS NOT DISTINCT FROM r.backend
    UNION ALL
    -- Named backends of this database holding events that no relay serves: a server whose relay
    -- has not started yet, or none at all (dropped: its events wait for a server of that name).
    SELECT current_database(), NULL,
           CASE WHEN EXISTS (SELECT 1 FROM pg_foreign_server s
                               JOIN pg_foreign_data_wrapper w ON w.oid = s.srvfdw
                              WHERE w.fdwname = 'broadcaster' AND s.srvname = h.backend)
                THEN 'stopped' ELSE 'no server' END,
           h.backend, false, NULL, NULL, NULL, h.pending, h.oldest_pending_age, h.dead,
           0, 0, 0, NULL, NULL
      FROM here h
     WHERE h.backend IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM relays r
                        WHERE r.datname = current_database() AND r.backend = h.backend)
$$;

CREATE VIEW @extschema@.broadcaster_status AS SELECT * FROM @extschema@.broadcaster_status();
REVOKE ALL ON FUNCTION @extschema@.broadcaster_status() FROM PUBLIC;
REVOKE ALL ON @extschema@.broadcaster_status FROM PUBLIC;


-- Retained events replay to the backend they went to; dead events say which.
CREATE OR REPLACE FUNCTION @extschema@.broadcaster_replay(ids uuid[]) RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    IF ids IS NULL THEN
        RAISE EXCEPTION 'broadcaster_replay: ids must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    INSERT INTO @extschema@.broadcaster_outbox
           (id, type, source, subject, time, datacontenttype, dataschema, data,
            partition_key, extensions, stream, backend)
    SELECT id, type, source, subject, time, datacontenttype, dataschema, data,
           partition_key, extensions, stream, backend
      FROM (SELECT DISTINCT ON (id) *
              FROM @extschema@.broadcaster_published
             WHERE id = ANY (ids)
             ORDER BY id, seq) first_publication
     ORDER BY seq;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

CREATE OR REPLACE VIEW @extschema@.broadcaster_dead_events AS
    SELECT o.id, o.type, o.source, o.subject, o.time, o.partition_key, o.stream,
           f.attempts, f.last_error, o.backend
      FROM @extschema@.broadcaster_outbox o
      JOIN @extschema@.broadcaster_failures f ON f.seq OPERATOR(pg_catalog.=) o.seq
     WHERE f.dead;

-- Named backends: the wrapper, its validator, and health per backend.
CREATE  FUNCTION @extschema@."broadcaster_fdw_validator"(
	"options" TEXT[], /* :: std :: option :: Option < Vec < Option < String > > > */
	"catalog" oid /* pg_sys :: Oid */
) RETURNS void
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'broadcaster_fdw_validator_wrapper';
CREATE  FUNCTION @extschema@."broadcaster_health"(
	"backend" TEXT /* Option < & str > */
) RETURNS bool /* bool */
VOLATILE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'broadcaster_health_of_wrapper';
-- Named backends: the servers of this foreign-data wrapper, as postgres_fdw and dblink keep
-- their connection settings. Its validator checks each server's options at CREATE and ALTER
-- SERVER; secrets may live in a USER MAPPING instead, readable only as PostgreSQL allows for
-- mappings. No handler: a broadcaster server holds no foreign tables. Only superusers may
-- create servers unless granted USAGE on the wrapper; an event names a server it may use
-- (USAGE on the server).
CREATE FOREIGN DATA WRAPPER broadcaster VALIDATOR @extschema@.broadcaster_fdw_validator;
COMMENT ON FOREIGN DATA WRAPPER broadcaster IS
    'Named broadcaster backends: CREATE SERVER name FOREIGN DATA WRAPPER broadcaster OPTIONS (backend ''redis'', url ''...'')';
REVOKE ALL ON FUNCTION @extschema@.broadcaster_health(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.broadcaster_fdw_validator(text[], pg_catalog.oid) FROM PUBLIC;

-- Every SQL and PL/pgSQL function pins search_path (0.1.0's could be hijacked through a schema
-- other roles can write to).
ALTER FUNCTION @extschema@.broadcaster_replay(uuid[]) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION @extschema@.broadcaster_replay(timestamptz, timestamptz, text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION @extschema@.broadcaster_requeue(uuid[]) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION @extschema@.broadcaster_requeue_all() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION @extschema@.broadcaster_discard(uuid[]) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION @extschema@.broadcaster_discard_all() SET search_path = pg_catalog, pg_temp;

-- broadcaster_publish(data json) loses its default for data, so that a call with the type
-- alone resolves to the text overload below instead of being ambiguous, and gains `backend`:
-- PostgreSQL can't drop a default or add an argument in place, so it is re-created (grant it
-- again, with the two new overloads).
DROP FUNCTION @extschema@.broadcaster_publish(text, json, text, text, text, jsonb, text);
CREATE FUNCTION @extschema@.broadcaster_publish(
    type          text,
    data          json,
    source        text  DEFAULT NULL,
    subject       text  DEFAULT NULL,
    partition_key text  DEFAULT NULL,
    extensions    jsonb DEFAULT NULL,
    stream        text  DEFAULT NULL,
    backend       text  DEFAULT NULL
) RETURNS uuid
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'broadcaster_publish';
REVOKE ALL ON FUNCTION @extschema@.broadcaster_publish(text, json, text, text, text, jsonb, text, text) FROM PUBLIC;

-- The same for jsonb data, the type most PostgreSQL users keep JSON in (to_jsonb(NEW) in a
-- trigger, psycopg's Jsonb, Django's JSONField): printed as PostgreSQL prints jsonb.
CREATE FUNCTION @extschema@.broadcaster_publish(
    type          text,
    data          jsonb,
    source        text  DEFAULT NULL,
    subject       text  DEFAULT NULL,
    partition_key text  DEFAULT NULL,
    extensions    jsonb DEFAULT NULL,
    stream        text  DEFAULT NULL,
    backend       text  DEFAULT NULL
) RETURNS uuid
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'broadcaster_publish';


-- And for text: an untyped literal or bind parameter ('{"a": 1}', a driver's plain string)
-- resolves here, as PostgreSQL prefers the string category for unknown arguments, so no call
-- is ambiguous between json and jsonb; kept byte for byte, and checked as JSON by the outbox's
-- trigger. The only overload whose data has a default: a call with the type alone comes here.
CREATE FUNCTION @extschema@.broadcaster_publish(
    type          text,
    data          text  DEFAULT NULL,
    source        text  DEFAULT NULL,
    subject       text  DEFAULT NULL,
    partition_key text  DEFAULT NULL,
    extensions    jsonb DEFAULT NULL,
    stream        text  DEFAULT NULL,
    backend       text  DEFAULT NULL
) RETURNS uuid
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'broadcaster_publish';
REVOKE ALL ON FUNCTION @extschema@.broadcaster_publish(text, jsonb, text, text, text, jsonb, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.broadcaster_publish(text, text, text, text, text, jsonb, text, text) FROM PUBLIC;

-- The database this outbox belongs to, by oid. A relay that finds another oid here serves a
-- copy, made by CREATE DATABASE ... TEMPLATE or by a restore: it says so in the log, with the
-- number of events it is about to relay from the copy, then records its own. Only the relay
-- writes it after this.
CREATE TABLE @extschema@.broadcaster_origin (database oid NOT NULL);
INSERT INTO @extschema@.broadcaster_origin
    SELECT oid FROM pg_catalog.pg_database WHERE datname OPERATOR(pg_catalog.=) pg_catalog.current_database();


-- Writes a logical replication worker applies to these tables are dropped: the publisher's
-- relay delivers the publisher's events, and its deletes and failures share seqs with this
-- database's own events. Enabled REPLICA: the trigger fires only with
-- session_replication_role = replica, never on the relay's or the producers' own writes.
CREATE TRIGGER broadcaster_replicated_row
    BEFORE INSERT OR UPDATE OR DELETE ON @extschema@.broadcaster_outbox
    FOR EACH ROW EXECUTE FUNCTION @extschema@.broadcaster_replicated_row();
ALTER TABLE @extschema@.broadcaster_outbox ENABLE REPLICA TRIGGER broadcaster_replicated_row;
CREATE TRIGGER broadcaster_replicated_row
    BEFORE INSERT OR UPDATE OR DELETE ON @extschema@.broadcaster_failures
    FOR EACH ROW EXECUTE FUNCTION @extschema@.broadcaster_replicated_row();
ALTER TABLE @extschema@.broadcaster_failures ENABLE REPLICA TRIGGER broadcaster_replicated_row;
CREATE TRIGGER broadcaster_replicated_row
    BEFORE INSERT OR UPDATE OR DELETE ON @extschema@.broadcaster_published
    FOR EACH ROW EXECUTE FUNCTION @extschema@.broadcaster_replicated_row();
ALTER TABLE @extschema@.broadcaster_published ENABLE REPLICA TRIGGER broadcaster_replicated_row;
CREATE TRIGGER broadcaster_replicated_row
    BEFORE INSERT OR UPDATE OR DELETE ON @extschema@.broadcaster_origin
    FOR EACH ROW EXECUTE FUNCTION @extschema@.broadcaster_replicated_row();
ALTER TABLE @extschema@.broadcaster_origin ENABLE REPLICA TRIGGER broadcaster_replicated_row;

-- Row-change capture: events from any table's writes with no application code.
--
--   CREATE TRIGGER orders_events AFTER INSERT OR UPDATE OR DELETE ON orders
--       FOR EACH ROW EXECUTE FUNCTION broadcaster_capture('shop.order');
--
-- Each row change becomes an event in the same transaction, through broadcaster_publish:
--   type           <prefix>.created | <prefix>.updated | <prefix>.deleted
--   data           {"table": "public.orders", "record": {...}, "changes": {...}}: record is the
--                  row after the change (before it, for a delete); for an update, changes holds
--                  the previous value of each column that changed (Sequin's shape: Debezium's
--                  "before" is record overlaid with changes). Excluded columns are in neither.
--   subject        the primary key's value (a composite key: its values as a JSON array)
--   partition_key  <table>:<subject>, so one row's changes arrive in commit order; a table
--                  without a primary key: <table> (all its changes in commit order, no subject)
-- Options, as further trigger arguments: 'exclude=col,col' (secrets: each must be a column, and
-- not a key column), 'stream=name', 'backend=name' (a named backend: a server of the
-- broadcaster wrapper), 'partition_key=column' (that column's value instead). A
-- partition's changes name, and take their key from, the partitioned table it belongs to. Runs with the rights of the role that writes the table:
-- it needs INSERT on broadcaster_outbox (and EXECUTE on broadcaster_publish), like any
-- producer.
CREATE FUNCTION @extschema@.broadcaster_capture() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_prefix   text;
    v_exclude  text[] := '{}';
    v_stream   text;
    v_backend  text;
    v_key_col  text;
    v_option   text;
    v_row      jsonb;
    v_record   jsonb;
    v_changes  jsonb;
    v_table    regclass;
    v_key_cols text[];
    v_subject  text;
    v_key      text;
    v_data     jsonb;
BEGIN
    IF TG_LEVEL OPERATOR(pg_catalog.<>) 'ROW' OR TG_WHEN OPERATOR(pg_catalog.<>) 'AFTER' THEN
        RAISE EXCEPTION 'broadcaster_capture: create it as an AFTER ... FOR EACH ROW trigger'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF TG_NARGS OPERATOR(pg_catalog.<) 1 OR TG_ARGV[0] IS NULL OR TG_ARGV[0] OPERATOR(pg_catalog.=) '' THEN
        RAISE EXCEPTION 'broadcaster_capture: give the event type''s prefix as the first argument'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'EXECUTE FUNCTION broadcaster_capture(''shop.order'')';
    END IF;
    v_prefix := TG_ARGV[0];
    FOR i IN 1 .. TG_NARGS OPERATOR(pg_catalog.-) 1 LOOP
        v_option := TG_ARGV[i];
        CASE pg_catalog.split_part(v_option, '=', 1)
            WHEN 'exclude' THEN
                SELECT COALESCE(pg_catalog.array_agg(pg_catalog.btrim(c)), '{}')
                  INTO v_exclude
                  FROM pg_catalog.unnest(pg_catalog.string_to_array(pg_catalog.substr(v_option, 9), ',')) c;
            WHEN 'stream' THEN
                v_stream := pg_catalog.substr(v_option, 8);
            WHEN 'backend' THEN
                v_backend := pg_catalog.substr(v_option, 9);
            WHEN 'partition_key' THEN
                v_key_col := pg_catalog.substr(v_option, 15);
            ELSE
                RAISE EXCEPTION 'broadcaster_capture: unknown option "%"', v_option
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'Options: exclude=col,col  stream=name  backend=name  partition_key=column';
        END CASE;
    END LOOP;

    IF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
        v_row := pg_catalog.to_jsonb(OLD);
    ELSE
        v_row := pg_catalog.to_jsonb(NEW);
    END IF;
    -- A column to leave out that is not there would leave a secret in, unseen.
    FOR i IN 1 .. COALESCE(pg_catalog.array_length(v_exclude, 1), 0) LOOP
        IF NOT v_row OPERATOR(pg_catalog.?) v_exclude[i] THEN
            RAISE EXCEPTION 'broadcaster_capture: exclude=% names no column of %', v_exclude[i], TG_TABLE_NAME
                USING ERRCODE = 'undefined_column';
        END IF;
    END LOOP;
    v_record := v_row OPERATOR(pg_catalog.-) v_exclude;
    IF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
        SELECT COALESCE(pg_catalog.jsonb_object_agg(o.key, o.value), '{}')
          INTO v_changes
          FROM pg_catalog.jsonb_each(pg_catalog.to_jsonb(OLD) OPERATOR(pg_catalog.-) v_exclude) o
         WHERE o.value IS DISTINCT FROM (v_record OPERATOR(pg_catalog.->) o.key);
    END IF;

    -- The table as the application names it: a partition's root.
    v_table := COALESCE(pg_catalog.pg_partition_root(TG_RELID), TG_RELID::pg_catalog.regclass);
    SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.ord)
      INTO v_key_cols
      FROM pg_catalog.pg_index i
     CROSS JOIN LATERAL pg_catalog.unnest(i.indkey::pg_catalog.int2[]) WITH ORDINALITY k(attnum, ord)
      JOIN pg_catalog.pg_attribute a
        ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid AND a.attnum OPERATOR(pg_catalog.=) k.attnum
     WHERE i.indrelid OPERATOR(pg_catalog.=) v_table AND i.indisprimary;
    -- The key's values become the subject and partition key: never those of a column left out.
    IF v_key_cols OPERATOR(pg_catalog.&&) v_exclude
       OR v_key_col OPERATOR(pg_catalog.=) ANY (v_exclude) THEN
        RAISE EXCEPTION 'broadcaster_capture: a key column of % is excluded; its value would be the event''s subject or partition key', v_table
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Leave key columns in, or name another partition_key column.';
    END IF;
    IF v_key_cols IS NULL THEN
        v_key := v_table::text;
    ELSIF pg_catalog.array_length(v_key_cols, 1) OPERATOR(pg_catalog.=) 1 THEN
        v_subject := v_row OPERATOR(pg_catalog.->>) v_key_cols[1];
        v_key := v_table::text OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) v_subject;
    ELSE
        SELECT pg_catalog.jsonb_agg(v_row OPERATOR(pg_catalog.->) c ORDER BY ord)::text
          INTO v_subject
          FROM pg_catalog.unnest(v_key_cols) WITH ORDINALITY u(c, ord);
        v_key := v_table::text OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) v_subject;
    END IF;
    IF v_key_col IS NOT NULL THEN
        IF NOT v_row OPERATOR(pg_catalog.?) v_key_col THEN
            RAISE EXCEPTION 'broadcaster_capture: partition_key=% names no column of %', v_key_col, v_table
                USING ERRCODE = 'undefined_column';
        END IF;
        v_key := v_row OPERATOR(pg_catalog.->>) v_key_col;
    END IF;

    v_data := pg_catalog.jsonb_build_object('table', v_table::text, 'record', v_record);
    IF v_changes IS NOT NULL THEN
        v_data := v_data OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('changes', v_changes);
    END IF;
    PERFORM @extschema@.broadcaster_publish(
        type          => v_prefix OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||)
                         CASE TG_OP WHEN 'INSERT' THEN 'created'
                                    WHEN 'UPDATE' THEN 'updated'
                                    ELSE 'deleted' END,
        data          => v_data,
        subject       => v_subject,
        partition_key => v_key,
        stream        => v_stream,
        backend       => v_backend);
    RETURN NULL;
END
$$;

REVOKE ALL ON @extschema@.broadcaster_origin FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.broadcaster_capture() FROM PUBLIC;

-- pg_dump leaves out the rows of an extension's tables unless its script marks them: without
-- this, a dump and restore would lose every undelivered, dead and retained event, and restart
-- seq at 1 (new events would then sort before restored ones). The identity sequence of seq is
-- marked too, so a restored outbox goes on above its highest seq.
SELECT pg_catalog.pg_extension_config_dump('@extschema@.broadcaster_outbox', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.broadcaster_failures', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.broadcaster_published', '');
SELECT pg_catalog.pg_extension_config_dump(
    pg_catalog.pg_get_serial_sequence('@extschema@.broadcaster_outbox', 'seq')::pg_catalog.regclass, '');
-- A restore brings the original's oid back with it: the relay then knows it serves a copy.
SELECT pg_catalog.pg_extension_config_dump('@extschema@.broadcaster_origin', '');

-- The grants 0.1.0's functions had (see the top of this script).
UPDATE pg_catalog.pg_proc p SET proacl = g.proacl
  FROM broadcaster_upgrade_grants g
 WHERE g.what OPERATOR(pg_catalog.=) 'relays'
   AND p.oid OPERATOR(pg_catalog.=) '@extschema@.broadcaster_relays()'::pg_catalog.regprocedure;
UPDATE pg_catalog.pg_proc p SET proacl = g.proacl
  FROM broadcaster_upgrade_grants g
 WHERE g.what OPERATOR(pg_catalog.=) 'publish'
   AND p.oid OPERATOR(pg_catalog.=) ANY (ARRAY[
       '@extschema@.broadcaster_publish(text, json, text, text, text, jsonb, text, text)'::pg_catalog.regprocedure,
       '@extschema@.broadcaster_publish(text, jsonb, text, text, text, jsonb, text, text)'::pg_catalog.regprocedure,
       '@extschema@.broadcaster_publish(text, text, text, text, text, jsonb, text, text)'::pg_catalog.regprocedure
       ]::pg_catalog.oid[]);
UPDATE pg_catalog.pg_proc p SET proacl = g.proacl
  FROM broadcaster_upgrade_grants g
 WHERE g.what OPERATOR(pg_catalog.=) 'status'
   AND p.oid OPERATOR(pg_catalog.=) '@extschema@.broadcaster_status()'::pg_catalog.regprocedure;
UPDATE pg_catalog.pg_class c SET relacl = g.proacl
  FROM broadcaster_upgrade_grants g
 WHERE g.what OPERATOR(pg_catalog.=) 'status view'
   AND c.oid OPERATOR(pg_catalog.=) '@extschema@.broadcaster_status'::pg_catalog.regclass;
DROP TABLE broadcaster_upgrade_grants;
