//! Housekeeping between batches: VACUUM of the outbox the relay empties, the purge of
//! retained events past `broadcaster.retention`, forgetting failures whose row is gone, and
//! noticing that this database is a copy of the one its outbox was written in.

use std::time::Duration;

use pgrx::prelude::*;

use super::claim::{in_schema, Statements};
use crate::guc;

/// Drops up to $2 published events older than the retention: small batches, never one huge
/// DELETE.
pub const PURGE: &str = "
DELETE FROM @extschema@.broadcaster_published
 WHERE ctid = ANY (ARRAY(SELECT ctid FROM @extschema@.broadcaster_published
                          WHERE published_at < now() - make_interval(secs => $1)
                          LIMIT $2))";

/// Deleted outbox rows after which the relay vacuums the outbox itself, once it has caught up.
/// The claim walks the primary key in `seq` order, over every index entry of a deleted row
/// until a VACUUM removes it: 150,000 of them turn a 0.1 ms claim into 1 ms, and autovacuum
/// comes at most once a minute (`autovacuum_naptime`), when 10,000 events a second leave
/// 600,000. A VACUUM of the small table a caught-up relay leaves takes a few milliseconds.
pub const VACUUM_WHEN_CAUGHT_UP: u64 = 1_000;
/// The same while draining a backlog, where each VACUUM also scans the backlog's index.
pub const VACUUM_DURING_BACKLOG: u64 = 100_000;
/// Least time between two of the relay's VACUUMs: at 10,000 events a second, one every 1,000
/// rows would stall a batch every 0.1 s.
pub const VACUUM_EVERY: Duration = Duration::from_secs(1);

/// How often the relay forgets failures whose row is gone ([`FORGET`]).
pub const FORGET_EVERY: Duration = Duration::from_secs(1);

/// Most rows one purge statement deletes.
const PURGE_BATCH: i64 = 1000;
/// How often an idle relay purges.
pub const PURGE_EVERY: Duration = Duration::from_secs(1);

/// Forgets failures whose row is gone (deleted by hand): they hold nothing, but keep the claim
/// on its slower path. Only those of `seq`s the outbox has handed out: a restore (pg_restore)
/// loads `broadcaster_failures` before `broadcaster_outbox`, and in between every failure looks
/// orphaned; its sequence is set after both, until then it is as new (`is_called` false).
/// `@outbox_seq@`: that sequence, by the name PostgreSQL gave it.
pub const FORGET: &str = "
DELETE FROM @extschema@.broadcaster_failures f
 WHERE NOT EXISTS (SELECT 1 FROM @extschema@.broadcaster_outbox o WHERE o.seq = f.seq)
   AND f.seq <= (SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END
                   FROM @outbox_seq@ s)";

/// Says so when this database is a copy of the one its outbox was written in
/// (`broadcaster_origin` holds another oid): `CREATE DATABASE ... TEMPLATE` of a served database,
/// or a restore of a dump. Its events are relayed all the same: after a restore they are the
/// ones the original never sent; from a clone of a served database, events the original sends
/// too go out twice, with the same ids, for consumers to de-duplicate on `ce_id`. Then records
/// this database as the outbox's own.
pub fn check_origin(database: &str, schema: &str) {
    let mine = crate::pg::my_database();
    let q = |sql: &str| in_schema(sql, schema);
    let result = Spi::connect_mut(|client| {
        // Not there while the database still has 0.1.0's SQL (ALTER EXTENSION ... UPDATE not run).
        let present = client
            .select(
                "SELECT pg_catalog.to_regclass($1) IS NOT NULL",
                None,
                &[format!("{schema}.broadcaster_origin").into()],
            )?
            .first()
            .get_one::<bool>()?
            .unwrap_or(false);
        if !present {
            return Ok(());
        }
        let copied = client
            .select(
                &q("SELECT count(*) FROM @extschema@.broadcaster_origin WHERE database <> $1"),
                None,
                &[mine.into()],
            )?
            .first()
            .get_one::<i64>()?
            .unwrap_or(0);
        if copied > 0 {
            let pending = client
                .select(
                    &q("SELECT count(*) FROM @extschema@.broadcaster_outbox"),
                    None,
                    &[],
                )?
                .first()
                .get_one::<i64>()?
                .unwrap_or(0);
            warning!(
                "broadcaster: database \"{database}\" is a copy of another database (CREATE DATABASE ... TEMPLATE, or a restore); its {pending} events are relayed from here, so events its original also relays go out twice, with the same ids (ce_id)"
            );
            client.update(
                &q("DELETE FROM @extschema@.broadcaster_origin WHERE database <> $1"),
                None,
                &[mine.into()],
            )?;
        }
        client.update(
            &q("INSERT INTO @extschema@.broadcaster_origin SELECT $1 \
                WHERE NOT EXISTS (SELECT 1 FROM @extschema@.broadcaster_origin)"),
            None,
            &[mine.into()],
        )?;
        Ok::<_, pgrx::spi::Error>(())
    });
    if let Err(e) = result {
        warning!("broadcaster: checking whether \"{database}\" is a copy failed: {e}");
    }
}

/// Drops published events past `broadcaster.retention`, a few small batches per idle pass.
pub fn purge(statements: &Statements) {
    let retention = guc::retention();
    if retention.is_zero() {
        return;
    }
    let result = Spi::connect_mut(|client| {
        for _ in 0..10 {
            let deleted = client
                .update(
                    &statements.purge,
                    None,
                    &[retention.as_secs_f64().into(), PURGE_BATCH.into()],
                )?
                .len();
            if (deleted as i64) < PURGE_BATCH {
                break;
            }
        }
        Ok::<_, pgrx::spi::Error>(())
    });
    if let Err(e) = result {
        warning!("broadcaster: purging published events failed: {e}");
    }
}

/// Forgets failures whose row is gone: see [`FORGET`].
pub fn forget_orphan_failures(statements: &Statements) {
    let result = Spi::connect_mut(|client| {
        client.update(&statements.forget, None, &[])?;
        Ok::<_, pgrx::spi::Error>(())
    });
    if let Err(e) = result {
        warning!("broadcaster: forgetting failures of deleted events failed: {e}");
    }
}

/// Vacuums the outbox when the relay has deleted enough rows since it last did (`caught_up`:
/// the outbox is about empty, so a VACUUM is cheap), at most once per [`VACUUM_EVERY`].
pub struct Vacuum {
    retired: u64,
    last: Option<std::time::Instant>,
}

impl Vacuum {
    pub fn new() -> Self {
        Vacuum {
            retired: 0,
            last: None,
        }
    }

    /// Counts `retired` deleted rows, and vacuums `outbox` if it is due.
    pub fn after(&mut self, retired: usize, caught_up: bool, outbox: pg_sys::Oid) {
        self.retired += retired as u64;
        let threshold = if caught_up {
            VACUUM_WHEN_CAUGHT_UP
        } else {
            VACUUM_DURING_BACKLOG
        };
        let due = self.last.is_none_or(|t| t.elapsed() >= VACUUM_EVERY);
        if self.retired >= threshold && due && !crate::shared::asked_to_leave() {
            crate::pg::vacuum(outbox);
            self.retired = 0;
            self.last = Some(std::time::Instant::now());
        }
    }
}
