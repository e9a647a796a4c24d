//! One pass of the relay: claim a batch, hand it to the backend, keep what was delivered and
//! count a failed attempt against what was rejected. The relay, not the backend, owns the rule
//! that a partition key's later events wait behind one that failed.

use std::sync::Arc;
use std::time::Duration;

use pgrx::prelude::*;

use super::claim::{self, Claimed, Deleted, Statements};
use super::{Tick, RETRY_BASE_DELAY};
use crate::backend::order::{in_key_order, publish_in_key_order, publish_in_runs};
use crate::backend::{key_runs, BatchError, Outcome, PublisherBackend};
use crate::event::OutboxEvent;
use crate::pg::{SignalsHeld, SubTransaction};
use crate::{guc, shared};

/// Deletes published rows after a batch that did not go out whole (by `seq`: the claim's delete
/// was undone).
pub const RETIRE: &str = "DELETE FROM @extschema@.broadcaster_outbox WHERE seq = ANY ($1)";

/// The columns an outbox row keeps in `broadcaster_published`: `backend` since 0.2.0.
pub fn published_columns(with_backend: bool) -> &'static str {
    if with_backend {
        "seq, id, type, source, subject, time, datacontenttype, dataschema, data, \
         partition_key, extensions, stream, backend"
    } else {
        "seq, id, type, source, subject, time, datacontenttype, dataschema, data, \
         partition_key, extensions, stream"
    }
}

/// With `broadcaster.retention` set: [`RETIRE`], keeping a copy for replay.
pub fn retire_and_keep_sql(with_backend: bool) -> String {
    let columns = published_columns(with_backend);
    format!(
        "WITH published AS (
    DELETE FROM @extschema@.broadcaster_outbox WHERE seq = ANY ($1) RETURNING *)
INSERT INTO @extschema@.broadcaster_published ({columns})
SELECT {columns} FROM published"
    )
}

/// Counts a failed attempt against the event `$1` (error `$2`), to be retried in `$3` seconds
/// or dead at `$4` attempts, noting its backend (since 0.2.0). Nothing when its row is gone.
pub fn fail_sql(with_backend: bool) -> String {
    let (column, value, update) = if with_backend {
        (
            ", backend",
            ", o.backend",
            ",\n       backend = EXCLUDED.backend",
        )
    } else {
        ("", "", "")
    };
    format!(
        "
INSERT INTO @extschema@.broadcaster_failures AS f
       (seq, partition_key, attempts, next_attempt_at, dead, last_error{column})
SELECT o.seq, o.partition_key, 1, now() + make_interval(secs => $3), 1 >= $4, $2{value}
  FROM @extschema@.broadcaster_outbox o
 WHERE o.seq = $1
    ON CONFLICT (seq) DO UPDATE
   SET partition_key = EXCLUDED.partition_key,
       attempts = f.attempts + 1,
       next_attempt_at = EXCLUDED.next_attempt_at,
       dead = f.attempts + 1 >= $4,
       last_error = EXCLUDED.last_error{update}"
    )
}

/// Forgets the failures of events delivered at last.
pub const CLEAR: &str = "DELETE FROM @extschema@.broadcaster_failures WHERE seq = ANY ($1)";

/// Batches in one transaction: at most this many, so that a crash sends at most this many
/// again (16,000 events with the default batch size), and the transaction never holds back
/// VACUUM for long (about 0.2 s while draining a backlog). Each transaction's first batch is
/// claimed and encoded while the broker waits, and its last is sent while the relay waits:
/// more batches per transaction spread that over more events, once the claims pass over the
/// rows the transaction deleted ([`Deleted`]). A/B drains against 4 batches without that: 16
/// with it, median 1.14 (10 pairs won of 11); 16 without it, 1.04; 4 with it, 1.0.
const BATCHES_PER_TRANSACTION: usize = 16;
/// While `broadcaster_failures` may hold rows: the checked claim reads every row the
/// transaction deleted again, at each claim.
const CHECKED_BATCHES_PER_TRANSACTION: usize = 4;

/// Up to [`BATCHES_PER_TRANSACTION`] batches in one transaction
/// ([`CHECKED_BATCHES_PER_TRANSACTION`] while failures may exist). Each is claimed by deleting
/// its rows, inside one subtransaction that is kept when every batch went in whole. While the
/// broker works on a full batch (a backend that is [`crate::backend::Pipelined`]), the relay
/// already claims the next one and hands it to the backend to prepare; it is sent once the
/// batch before it is known to be in, so a key keeps its order. When a batch does not go in
/// whole (an event rejected or not sent, a row that isn't an event, an outage), the
/// subtransaction is rolled back, every claimed row is pending again, and the rows known to be
/// delivered are deleted and the failures recorded one by one.
pub fn relay_batch(statements: &Statements, backend: &mut dyn PublisherBackend) -> Tick {
    let batch_size = guc::batch_size();
    let checked = claim::failures_possible(statements);
    let subxact = SubTransaction::begin();
    let mut claimed = claim::claim(statements, batch_size, checked, Deleted::NONE);
    let mut deleted = Deleted::NONE.after(&claimed.seqs);
    let rounds = if checked {
        CHECKED_BATCHES_PER_TRANSACTION
    } else {
        BATCHES_PER_TRANSACTION
    };
    // Rows of the batches delivered whole so far.
    let mut delivered = Delivered::default();
    let mut full = false;
    for round in 1..=rounds {
        if claimed.seqs.is_empty() {
            break;
        }
        full = claimed.seqs.len() >= batch_size;
        // Claim ahead only after a full batch of events, never past the transaction's last.
        // Nor once a command needs the database alone: the relay finishes this batch and goes.
        let ahead =
            full && round < rounds && claimed.unreadable.is_empty() && !shared::asked_to_leave();
        let mut next = None;
        let mut claim_next = || {
            let batch = claim::claim(statements, batch_size, checked, deleted);
            deleted = deleted.after(&batch.seqs);
            batch
        };
        let events = Arc::clone(&claimed.events);
        // Runs in which no key repeats, for a backend that does not keep key order itself.
        let runs = (!backend.keeps_key_order())
            .then(|| key_runs(&events))
            .filter(|runs| runs.len() > 1);
        let outcome = if events.is_empty() {
            Ok(Vec::new())
        } else if let Some(runs) = runs {
            let _held = SignalsHeld::new();
            publish_in_runs(backend, &events, runs)
        } else {
            match backend.pipelined() {
                Some(pipelined) => {
                    let sent = {
                        let _held = SignalsHeld::new();
                        pipelined.send(&events)
                    };
                    sent.and_then(|()| {
                        if ahead {
                            let batch = claim_next();
                            if !batch.events.is_empty() {
                                pipelined.prepare(&batch.events);
                            }
                            next = Some(batch);
                        }
                        let _held = SignalsHeld::new();
                        pipelined.receive()
                    })
                }
                None => {
                    let _held = SignalsHeld::new();
                    backend.publish(&events)
                }
            }
        };
        let outcome = outcome.and_then(|o| key_order_checked(backend.name(), &events, o));
        let whole = claimed.unreadable.is_empty()
            && matches!(&outcome, Ok(o) if o.iter().all(|o| *o == Outcome::Delivered));
        if !whole {
            drop(next);
            subxact.roll_back();
            return settle(statements, delivered, claimed, full, outcome);
        }
        shared::record_success(claimed.seqs.len());
        for (&seq, &attempts) in claimed.seqs.iter().zip(&claimed.attempts) {
            delivered.add(seq, attempts);
        }
        claimed = match next {
            Some(batch) => batch,
            None if ahead => claim_next(),
            None => Claimed::default(),
        };
    }
    subxact.commit();
    if delivered.seqs.is_empty() {
        return Tick::Idle;
    }
    if !delivered.recovered.is_empty() {
        retire(statements, &[], &delivered.recovered, &[]);
    }
    Tick::Published {
        full,
        retired: delivered.seqs.len(),
    }
}

/// One batch for a backend that writes in the relay's own transaction (`function`): its rows
/// are read and locked, not deleted, while the backend runs; then the delivered ones are
/// deleted and the rejected ones counted, so that what the backend wrote commits with them.
pub fn relay_in_transaction(statements: &Statements, backend: &mut dyn PublisherBackend) -> Tick {
    let batch_size = guc::batch_size();
    let claimed = claim::peek(statements, batch_size);
    if claimed.seqs.is_empty() {
        return Tick::Idle;
    }
    let full = claimed.seqs.len() >= batch_size;
    let events = Arc::clone(&claimed.events);
    let outcome = if events.is_empty() {
        Ok(Vec::new())
    } else {
        publish_in_key_order(backend, &events)
    }
    .and_then(|o| key_order_checked(backend.name(), &events, o));
    settle(statements, Delivered::default(), claimed, full, outcome)
}

/// Rows delivered in this transaction, and those of them that had failed before.
#[derive(Default)]
pub struct Delivered {
    seqs: Vec<i64>,
    recovered: Vec<i64>,
}

impl Delivered {
    fn add(&mut self, seq: i64, attempts: i32) {
        self.seqs.push(seq);
        if attempts > 0 {
            self.recovered.push(seq);
        }
    }
}

/// After the claims were undone (or for rows never deleted): deletes the rows delivered
/// (`delivered`, and the events of `batch` that went in), counts a failed attempt against each
/// rejected or unreadable row, and leaves the rest pending. When `batch` was `full`, more rows
/// may be ready behind it.
fn settle(
    statements: &Statements,
    mut delivered: Delivered,
    batch: Claimed,
    full: bool,
    outcome: Result<Vec<Outcome>, BatchError>,
) -> Tick {
    let Claimed {
        seqs,
        attempts,
        sent,
        unreadable: mut failed,
        ..
    } = batch;
    let before = delivered.seqs.len();
    let mut outage = None;
    match outcome {
        // Not the events' fault: the batch stays pending.
        Err(e) => outage = Some(e),
        Ok(outcome) => {
            for (i, result) in sent.into_iter().zip(outcome) {
                match result {
                    Outcome::Delivered => delivered.add(seqs[i], attempts[i]),
                    // Behind a failed event of its key: stays pending, untouched.
                    Outcome::NotSent => {}
                    // Not this event's fault: it stays pending, untouched.
                    Outcome::Deferred(e) => outage = Some(BatchError::Unavailable(e)),
                    Outcome::Rejected(e) => failed.push((i, e)),
                }
            }
        }
    }
    let failed: Vec<(i64, i32, String)> = failed
        .into_iter()
        .map(|(i, e)| (seqs[i], attempts[i], e))
        .collect();
    retire(statements, &delivered.seqs, &delivered.recovered, &failed);
    shared::record_success(delivered.seqs.len() - before);
    if let Some((_, _, error)) = failed.last() {
        shared::record_failure(failed.len(), error);
    }
    match outage {
        Some(e) => Tick::Outage(e),
        None if delivered.seqs.is_empty() && failed.is_empty() => Tick::Idle,
        None => Tick::Published {
            full,
            retired: delivered.seqs.len(),
        },
    }
}

/// Deletes what was published (by `seq`), forgets the failures of the `recovered` among them,
/// and counts an attempt against each failed row (seq, attempts so far, error), scheduling its
/// retry or marking it dead.
fn retire(
    statements: &Statements,
    published: &[i64],
    recovered: &[i64],
    failed: &[(i64, i32, String)],
) {
    let max_attempts = guc::max_attempts();
    let cap = guc::retry_max_delay().max(RETRY_BASE_DELAY);
    let result = Spi::connect_mut(|client| {
        if !published.is_empty() {
            let retire = if guc::retention().is_zero() {
                &statements.retire
            } else {
                &statements.retire_and_keep
            };
            client.update(retire, None, &[published.to_vec().into()])?;
        }
        if !recovered.is_empty() {
            client.update(&statements.clear, None, &[recovered.to_vec().into()])?;
        }
        if !failed.is_empty() {
            claim::failure_recorded();
        }
        for (seq, attempts, error) in failed {
            // The event's own backoff: 1 s, 2 s, 4 s ... up to the cap.
            let delay = Duration::from_secs(1u64 << (*attempts).clamp(0, 20)).min(cap);
            client.update(
                &statements.fail,
                None,
                &[
                    (*seq).into(),
                    error.as_str().into(),
                    delay.as_secs_f64().into(),
                    max_attempts.into(),
                ],
            )?;
        }
        Ok::<_, pgrx::spi::Error>(())
    });
    if let Err(e) = result {
        // Abort: the batch stays pending and goes out again (same ids), rather than this
        // transaction committing as if it had been retired.
        error!("broadcaster: recording delivery results failed: {e}");
    }
}

/// [`in_key_order`], saying in the log when the backend broke a key's order.
fn key_order_checked(
    backend: &str,
    events: &[OutboxEvent],
    outcome: Vec<Outcome>,
) -> Result<Vec<Outcome>, BatchError> {
    let (outcome, broken) = in_key_order(backend, events, outcome)?;
    if let Some(key) = broken {
        warning!(
            "broadcaster: the {backend} backend delivered an event of partition key \"{key}\" after an earlier one of the key failed: the key's order is broken"
        );
    }
    Ok(outcome)
}
