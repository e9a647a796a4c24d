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
