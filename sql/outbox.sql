-- Every name here is qualified (@extschema@ for the extension's own objects, pg_catalog for
-- PostgreSQL's), and every function pins search_path to pg_catalog, pg_temp: the schema the
-- extension lives in (public, often) may be writable by other roles, and the functions run as
-- superusers and operators; nothing may resolve through it to an object someone else made.

-- The outbox: one row per event not yet delivered, and nothing else, so that an INSERT stays
-- cheap: columns carry CloudEvents attribute names, and all but type have defaults, so an INSERT
-- naming only type and data is complete. Delivery failures are kept apart, in
-- broadcaster_failures.
CREATE TABLE @extschema@.broadcaster_outbox (
    -- Publish order: the worker relays in this order, per partition key across transactions
    -- that commit one after another.
    seq             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id              uuid        NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
    type            text        NOT NULL,
    source          text        NOT NULL DEFAULT @extschema@.broadcaster_default_source(),
    subject         text,
    time            timestamptz NOT NULL DEFAULT pg_catalog.now(),
    datacontenttype text        NOT NULL DEFAULT 'application/json',
    dataschema      text,
    data            json,
    partition_key   text,
    extensions      jsonb       NOT NULL DEFAULT '{}',
    stream          text,
    -- The named backend the event goes to: a server of the broadcaster foreign-data wrapper
    -- (CREATE SERVER ... FOREIGN DATA WRAPPER broadcaster), on which the writer has USAGE.
    -- NULL: the default backend (broadcaster.backend and its settings).
    backend         text
);

-- Each named backend's relay claims its events in seq order through this index. Partial: an
-- event for the default backend costs no entry here.
CREATE INDEX broadcaster_outbox_backend ON @extschema@.broadcaster_outbox (backend, seq)
    WHERE backend IS NOT NULL;

-- Validation and wake-up, written in Rust: raises SQLSTATE 22023 naming the column at fault
-- (23514 for a time RFC 3339 can't carry: infinite, or outside years 1 to 9999), for raw INSERTs and the function alike, and wakes the relay when the
-- transaction commits. A row trigger rather than a CHECK constraint: Postgres prepares a CHECK
-- expression again for every INSERT statement, a cost a one-row INSERT pays in full. ALWAYS, so
-- that it applies like a constraint whatever session_replication_role says.
CREATE TRIGGER broadcaster_outbox_accept
    BEFORE INSERT OR UPDATE ON @extschema@.broadcaster_outbox
    FOR EACH ROW EXECUTE FUNCTION @extschema@.broadcaster_outbox_accept();
ALTER TABLE @extschema@.broadcaster_outbox ENABLE ALWAYS TRIGGER broadcaster_outbox_accept;

-- Events whose delivery failed: one row per outbox row (same seq) that Redis refused at least
-- once, deleted with it when it is delivered or discarded (within a second when the row is
-- deleted by hand; with the outbox when that is truncated). Only the relay writes it (others
-- only delete from it, as requeue and discard do): once the relay has seen it empty, it claims
-- without looking at it until it records a failure. A row here waits until next_attempt_at, or
-- for good once dead; the later events of its key wait behind it (behind a dead one only with
-- broadcaster.on_dead_event = hold).
CREATE TABLE @extschema@.broadcaster_failures (
    seq             bigint      PRIMARY KEY,
    partition_key   text,
    attempts        integer     NOT NULL,
    next_attempt_at timestamptz NOT NULL,
    dead            boolean     NOT NULL,
    last_error      text        NOT NULL,
    -- The event's backend when it failed: each backend's relay looks at its own failures.
    backend         text
);
CREATE INDEX broadcaster_failures_key ON @extschema@.broadcaster_failures (partition_key, seq);
CREATE TRIGGER broadcaster_failures_cleared
    AFTER DELETE ON @extschema@.broadcaster_failures
    FOR EACH STATEMENT EXECUTE FUNCTION @extschema@.broadcaster_failures_cleared();

-- TRUNCATE broadcaster_outbox (RESTART IDENTITY, say) takes the failures with it: a new event
-- must never meet an old failure under a reused seq. As the extension's owner: whoever may
-- truncate the outbox may forget its failures.
CREATE FUNCTION @extschema@.broadcaster_outbox_truncated() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    TRUNCATE @extschema@.broadcaster_failures;
    RETURN NULL;
END
$$;
CREATE TRIGGER broadcaster_outbox_truncated
    AFTER TRUNCATE ON @extschema@.broadcaster_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION @extschema@.broadcaster_outbox_truncated();

COMMENT ON TABLE @extschema@.broadcaster_outbox IS
    'Transactional outbox: rows committed here are relayed by the broadcaster worker as CloudEvents, then deleted.';

-- Writes one event in the caller's transaction and returns its id. Runs with the caller's
-- rights: INSERT on broadcaster_outbox (the id is made by the function, so no SELECT is
-- needed). Written in Rust (src/api.rs): one INSERT through a plan kept for the session. No
-- pinned search_path: that INSERT names every object with its schema, and a pinned path would
-- save and restore the setting at every call of the producers' hot path.
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

-- Published events, kept for broadcaster.retention (0: none are kept) so they can be replayed.
-- The relay purges them in small batches.
CREATE TABLE @extschema@.broadcaster_published (
    seq             bigint      NOT NULL,
    id              uuid        NOT NULL,
    type            text        NOT NULL,
    source          text        NOT NULL,
    subject         text,
    time            timestamptz NOT NULL,
    datacontenttype text        NOT NULL,
    dataschema      text,
    data            json,
    partition_key   text,
    extensions      jsonb       NOT NULL,
    stream          text,
    published_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    backend         text
);
CREATE INDEX broadcaster_published_published_at ON @extschema@.broadcaster_published (published_at);
CREATE INDEX broadcaster_published_id ON @extschema@.broadcaster_published (id);
CREATE INDEX broadcaster_published_time ON @extschema@.broadcaster_published (time);

-- Sends retained events again, as new deliveries with the same ids (ce_id), in their original
-- order, each once (a replayed event is retained again); returns how many.
CREATE FUNCTION @extschema@.broadcaster_replay(ids uuid[]) RETURNS bigint
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

-- The same for retained events whose time is in [since, until), optionally of one type.
CREATE FUNCTION @extschema@.broadcaster_replay(since timestamptz, until timestamptz DEFAULT 'infinity',
                                   event_type text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF since IS NULL OR until IS NULL THEN
        RAISE EXCEPTION 'broadcaster_replay: since and until must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF since > until THEN
        RAISE EXCEPTION 'broadcaster_replay: since (%) is after until (%)', since, until
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN @extschema@.broadcaster_replay(ARRAY(
        SELECT p.id FROM @extschema@.broadcaster_published p
         WHERE p.time >= since AND p.time < until
           AND (event_type IS NULL OR p.type = event_type)));
END
$$;

-- Dead events: retried broadcaster.max_attempts times and refused each time.
CREATE VIEW @extschema@.broadcaster_dead_events AS
    SELECT o.id, o.type, o.source, o.subject, o.time, o.partition_key, o.stream,
           f.attempts, f.last_error, o.backend
      FROM @extschema@.broadcaster_outbox o
      JOIN @extschema@.broadcaster_failures f ON f.seq OPERATOR(pg_catalog.=) o.seq
     WHERE f.dead;

-- Sends dead events again, with a fresh attempt count; returns how many were requeued. The
-- relay is woken when the transaction commits (broadcaster_failures_cleared).
CREATE FUNCTION @extschema@.broadcaster_requeue(ids uuid[]) RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    IF ids IS NULL THEN
        RAISE EXCEPTION 'broadcaster_requeue: ids must not be NULL'
            USING ERRCODE = 'null_value_not_allowed', HINT = 'To requeue every dead event, call broadcaster_requeue_all().';
    END IF;
    DELETE FROM @extschema@.broadcaster_failures f
     USING @extschema@.broadcaster_outbox o
     WHERE f.dead AND o.seq = f.seq AND o.id = ANY (ids);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

CREATE FUNCTION @extschema@.broadcaster_requeue_all() RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    DELETE FROM @extschema@.broadcaster_failures f
     USING @extschema@.broadcaster_outbox o
     WHERE f.dead AND o.seq = f.seq;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Deletes dead events for good; returns how many were discarded.
CREATE FUNCTION @extschema@.broadcaster_discard(ids uuid[]) RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    IF ids IS NULL THEN
        RAISE EXCEPTION 'broadcaster_discard: ids must not be NULL'
            USING ERRCODE = 'null_value_not_allowed', HINT = 'To discard every dead event, call broadcaster_discard_all().';
    END IF;
    WITH discarded AS (
        DELETE FROM @extschema@.broadcaster_outbox o
         USING @extschema@.broadcaster_failures f
         WHERE f.dead AND o.seq = f.seq AND o.id = ANY (ids)
        RETURNING o.seq)
    DELETE FROM @extschema@.broadcaster_failures f
     WHERE f.seq IN (SELECT seq FROM discarded);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

CREATE FUNCTION @extschema@.broadcaster_discard_all() RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    WITH discarded AS (
        DELETE FROM @extschema@.broadcaster_outbox o
         USING @extschema@.broadcaster_failures f
         WHERE f.dead AND o.seq = f.seq
        RETURNING o.seq)
    DELETE FROM @extschema@.broadcaster_failures f
     WHERE f.seq IN (SELECT seq FROM discarded);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- One row per relay since the cluster started, that is per database and backend (`backend`:
-- the server's name; NULL for the default backend; `kind`: redis, file, function): shared
-- memory, plus the outbox's own counts for the current database (NULL for the others, whose
-- outboxes this session can't read). `state`: running, read only, stopped, standby, or
-- `no server` for a named backend whose server was dropped (its events wait for one).
-- `warning`: what the backend found wrong with its broker that is not an outage, such as a
-- Redis memory policy that may evict the streams; NULL when nothing is.
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
