-- The outbox: one row per event not yet delivered. Columns carry CloudEvents attribute names;
-- the delivery columns have defaults, so an INSERT naming only type and data is complete.
CREATE TABLE broadcaster_outbox (
    -- Publish order: the worker relays in this order, per partition key across transactions
    -- that commit one after another.
    seq             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    type            text        NOT NULL,
    source          text        NOT NULL DEFAULT broadcaster_default_source(),
    subject         text,
    time            timestamptz NOT NULL DEFAULT now(),
    datacontenttype text        NOT NULL DEFAULT 'application/json',
    dataschema      text,
    data            jsonb,
    partition_key   text,
    extensions      jsonb       NOT NULL DEFAULT '{}',
    stream          text,
    -- Delivery bookkeeping, written by the worker.
    state           text        NOT NULL DEFAULT 'pending',
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT '-infinity',
    last_error      text,
    CONSTRAINT broadcaster_outbox_state CHECK (state IN ('pending', 'dead')),
    -- Raises SQLSTATE 22023 naming the column at fault, for raw INSERTs and the function alike.
    CONSTRAINT broadcaster_outbox_valid_event CHECK (
        broadcaster_check_event(type, source, datacontenttype, dataschema, extensions, stream)
    )
);

COMMENT ON TABLE broadcaster_outbox IS
    'Transactional outbox: rows committed here are relayed by the broadcaster worker as CloudEvents, then deleted.';

CREATE TRIGGER broadcaster_wake_on_commit
    AFTER INSERT OR UPDATE ON broadcaster_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION broadcaster_wake_on_commit();

-- Writes one event in the caller's transaction and returns its id.
CREATE FUNCTION broadcaster_publish(
    type          text,
    data          jsonb DEFAULT NULL,
    source        text  DEFAULT NULL,
    subject       text  DEFAULT NULL,
    partition_key text  DEFAULT NULL,
    extensions    jsonb DEFAULT NULL,
    stream        text  DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    event_id uuid;
BEGIN
    INSERT INTO @extschema@.broadcaster_outbox (type, data, source, subject, partition_key, extensions, stream)
    VALUES (
        broadcaster_publish.type,
        broadcaster_publish.data,
        coalesce(broadcaster_publish.source, @extschema@.broadcaster_default_source()),
        broadcaster_publish.subject,
        broadcaster_publish.partition_key,
        coalesce(broadcaster_publish.extensions, '{}'),
        broadcaster_publish.stream
    )
    RETURNING id INTO event_id;
    RETURN event_id;
END
$$;
