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
