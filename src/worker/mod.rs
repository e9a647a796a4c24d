//! The workers: the launcher (`launcher.rs`) starts a relay (`relay.rs`) per database and
//! backend; each pass of a relay claims a batch (`claim.rs`), hands it to the backend and keeps
//! what was delivered (`batch.rs`), with housekeeping in between (`housekeeping.rs`). The
//! `function` backend, which runs SQL, is here too (`function.rs`). Their raw PostgreSQL calls
//! are in the crate's `pg.rs`.

use std::time::Duration;

use crate::backend::BatchError;
#[cfg(any(test, feature = "pg_test"))]
use pgrx::prelude::*;

mod batch;
mod claim;
pub(crate) mod function;
mod housekeeping;
mod launcher;
mod relay;

pub use launcher::register;

/// How soon a worker that exited with an error is started again.
const RESTART_DELAY: Duration = Duration::from_secs(5);
/// First retry delay after a broker outage; doubles up to `broadcaster.retry_max_delay`.
const RETRY_BASE_DELAY: Duration = Duration::from_millis(100);

/// What one pass of a relay found.
enum Tick {
    /// The outbox had nothing ready.
    Idle,
    /// A batch went out (`retired` rows deleted); there may be more when it was `full`.
    Published { full: bool, retired: usize },
    /// The database is read-only (`default_transaction_read_only`): nothing can be claimed.
    ReadOnly,
    /// The broker is unavailable or the backend misconfigured: back off.
    Outage(BatchError),
    /// The relay's server changed (`ALTER SERVER`, its user mapping): nothing was claimed; the
    /// backend is built again before the next claim.
    Reconfigured,
    /// The relay's server is gone (`DROP SERVER`, a rename): the relay leaves.
    ServerGone,
}

#[cfg(test)]
mod unit_tests {
    use super::claim::Deleted;

    fn run(lo: i64, hi: i64) -> Deleted {
        Deleted { lo, hi }
    }

    #[test]
    fn the_deleted_run_grows_only_by_seqs_that_follow_on() {
        // A first claim: the longest run, not the first.
        let first = Deleted::NONE.after(&[3, 10, 11, 12, 20]);
        assert_eq!(first, run(10, 12));
        // A next claim continuing it grows it, up to its first gap.
        assert_eq!(first.after(&[13, 14, 16]), run(10, 14));
        // Rows below the run (committed since) and a gap right after it leave it as it is.
        assert_eq!(first.after(&[1, 2, 14, 15]), run(10, 12));
        // A longer run elsewhere replaces it.
        assert_eq!(first.after(&[30, 31, 32, 33]), run(30, 33));
        // Nothing claimed: nothing passed over; and no overflow at the end of bigint.
        assert_eq!(Deleted::NONE.after(&[]), Deleted::NONE);
        assert_eq!(Deleted::NONE.after(&[7]), run(7, 7));
        assert_eq!(
            run(i64::MAX - 1, i64::MAX).after(&[1]),
            run(i64::MAX - 1, i64::MAX)
        );
        assert_eq!(Deleted::NONE.len(), 0);
    }

    #[test]
    fn timestamps_become_rfc3339_in_utc() {
        use super::claim::rfc3339;
        let day = 86_400 * 1_000_000_i64;
        assert_eq!(rfc3339(0), "2000-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(-1), "1999-12-31T23:59:59.999999Z");
        assert_eq!(rfc3339(-10_957 * day), "1970-01-01T00:00:00.000000Z");
        // 2024-02-29 07:08:09.123456, a leap day.
        let leap = (8_825 * 86_400 + 7 * 3_600 + 8 * 60 + 9) * 1_000_000 + 123_456;
        assert_eq!(rfc3339(leap), "2024-02-29T07:08:09.123456Z");
        // The outbox's bounds: '0001-01-01 00:00:00+00' and '9999-12-31 23:59:59.999999+00'.
        assert_eq!(
            rfc3339(-63_082_281_600_000_000),
            "0001-01-01T00:00:00.000000Z"
        );
        assert_eq!(
            rfc3339(252_455_615_999_999_999),
            "9999-12-31T23:59:59.999999Z"
        );
        // Past them (a row written with the trigger disabled): no time, and no panic.
        for outside in [
            i64::MIN,
            -63_082_281_600_000_001,
            252_455_616_000_000_000,
            i64::MAX,
        ] {
            assert!(!rfc3339(outside).contains('T'), "{outside}");
        }
    }

    #[test]
    fn uuids_in_canonical_form() {
        let bytes = [
            0x7d, 0x2c, 0x5b, 0xd4, 0x4f, 0x7e, 0x4a, 0x53, 0x8d, 0x4c, 0x5d, 0x1d, 0x7a, 0x1c,
            0x0e, 0x11,
        ];
        assert_eq!(
            super::claim::uuid_text(&bytes),
            "7d2c5bd4-4f7e-4a53-8d4c-5d1d7a1c0e11"
        );
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// The relay's statement `sql`, naming the extension's schema as the relay does.
    fn ours(sql: &str) -> String {
        let schema = Spi::get_one::<String>(
            "SELECT quote_ident(n.nspname) FROM pg_extension e \
               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'broadcaster'",
        )
        .expect("query")
        .expect("the extension's schema");
        super::claim::in_schema(sql, &schema)
    }

    /// How many rows `ready` finds for the default backend, 10 at most, dead events holding
    /// their key.
    fn ready() -> i64 {
        Spi::get_one_with_args::<i64>(
            &format!(
                "SELECT count(*) FROM ({}) r",
                ours(&super::claim::ready(&super::claim::Scope::Default))
            ),
            &[10_i64.into(), true.into(), None::<String>.into()],
        )
        .expect("query")
        .unwrap_or(-1)
    }

    #[pg_test]
    fn a_failure_holds_its_key_only_while_its_row_is_there() {
        Spi::run("INSERT INTO broadcaster_outbox (type, partition_key) VALUES ('a', 'k'), ('b', 'k'), ('c', 'j')")
            .expect("rows");
        assert_eq!(ready(), 3);
        // The first row of k failed, its retry not due: k waits, j goes.
        Spi::run(
            "INSERT INTO broadcaster_failures (seq, partition_key, attempts, next_attempt_at, dead, last_error) \
             SELECT seq, 'k', 1, now() + interval '1 hour', false, 'WRONGTYPE' \
               FROM broadcaster_outbox WHERE type = 'a'",
        )
        .expect("failure");
        assert_eq!(ready(), 1);
        // Deleted by hand: its failure, until forgotten, holds nothing.
        Spi::run("DELETE FROM broadcaster_outbox WHERE type = 'a'").expect("delete");
        assert_eq!(ready(), 2);
        // Nor one whose row took another key since.
        Spi::run(
            "INSERT INTO broadcaster_outbox (type, partition_key) VALUES ('d', 'k'); \
             INSERT INTO broadcaster_failures (seq, partition_key, attempts, next_attempt_at, dead, last_error) \
             SELECT seq, 'k', 1, now() - interval '1 hour', true, 'WRONGTYPE' \
               FROM broadcaster_outbox WHERE type = 'b'; \
             UPDATE broadcaster_outbox SET partition_key = 'moved' WHERE type = 'b'",
        )
        .expect("moved");
        // b is dead (not ready); d, of k, no longer waits behind it; c goes.
        assert_eq!(ready(), 2);
    }

    /// The seqs `all_past` finds for the default backend, 10 at most, passing over `lo` to
    /// `hi`.
    fn all_but(lo: i64, hi: i64) -> Vec<i64> {
        let sql = format!(
            "SELECT array_agg(o.seq ORDER BY o.seq) FROM broadcaster_outbox o \
              WHERE o.ctid = ANY (ARRAY({}))",
            ours(&super::claim::all_past(&super::claim::Scope::Default))
        );
        Spi::get_one_with_args::<Vec<i64>>(
            &sql,
            &[10_i64.into(), lo.into(), hi.into(), None::<String>.into()],
        )
        .expect("query")
        .unwrap_or_default()
    }

    #[pg_test]
    fn the_claim_passes_over_only_the_rows_named() {
        Spi::run(
            "INSERT INTO broadcaster_outbox (seq, type) OVERRIDING SYSTEM VALUE \
             SELECT g, 'e' FROM generate_series(1, 12) g",
        )
        .expect("rows");
        let none = super::claim::Deleted::NONE;
        assert_eq!(all_but(none.lo, none.hi), (1..=10).collect::<Vec<_>>());
        // Rows before the run (a transaction that committed late) come first, in order.
        assert_eq!(all_but(3, 6), vec![1, 2, 7, 8, 9, 10, 11, 12]);
        assert_eq!(all_but(1, 12), Vec::<i64>::new());
        // Both scans together find more than the limit: the first 10 in order.
        assert_eq!(all_but(11, 11), (1..=10).collect::<Vec<_>>());
        assert_eq!(all_but(2, 2), vec![1, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(
            all_but(i64::MAX - 1, i64::MAX),
            (1..=10).collect::<Vec<_>>()
        );
    }

    #[pg_test]
    fn truncating_the_outbox_forgets_its_failures() {
        Spi::run(
            "INSERT INTO broadcaster_outbox (type) VALUES ('a'); \
             INSERT INTO broadcaster_failures (seq, attempts, next_attempt_at, dead, last_error) \
             SELECT seq, 1, now(), true, 'x' FROM broadcaster_outbox; \
             TRUNCATE broadcaster_outbox RESTART IDENTITY",
        )
        .expect("truncate");
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM broadcaster_failures").expect("count"),
            Some(0)
        );
    }
}
