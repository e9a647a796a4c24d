-- Least privilege: nothing is granted to PUBLIC. A producer role needs
--   GRANT INSERT ON broadcaster_outbox TO app;
--   GRANT EXECUTE ON FUNCTION broadcaster_publish(text, text, text, text, text, jsonb, text, text),
--                             broadcaster_publish(text, json, text, text, text, jsonb, text, text),
--                             broadcaster_publish(text, jsonb, text, text, text, jsonb, text, text) TO app;
-- and, to name a backend, GRANT USAGE ON FOREIGN SERVER name TO app;
-- The row validation and default-source functions stay callable by everyone: every INSERT
-- runs them, and they read nothing.
REVOKE ALL ON @extschema@.broadcaster_outbox FROM PUBLIC;
REVOKE ALL ON @extschema@.broadcaster_dead_events FROM PUBLIC;
REVOKE ALL ON @extschema@.broadcaster_failures FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.broadcaster_publish(text, json, text, text, text, jsonb, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.broadcaster_publish(text, jsonb, text, text, text, jsonb, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.broadcaster_publish(text, text, text, text, text, jsonb, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.broadcaster_health() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.broadcaster_health(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.broadcaster_fdw_validator(text[], pg_catalog.oid) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.broadcaster_requeue(uuid[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.broadcaster_requeue_all() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.broadcaster_discard(uuid[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.broadcaster_discard_all() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.broadcaster_relays() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.broadcaster_status() FROM PUBLIC;
REVOKE ALL ON @extschema@.broadcaster_status FROM PUBLIC;
REVOKE ALL ON @extschema@.broadcaster_published FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.broadcaster_replay(uuid[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.broadcaster_replay(timestamptz, timestamptz, text) FROM PUBLIC;
REVOKE ALL ON @extschema@.broadcaster_origin FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.broadcaster_capture() FROM PUBLIC;
