//! The relay's rule that a partition key's events never overtake each other, whatever the
//! backend: plain Rust, so that it is tested without Postgres. A backend that does not keep
//! key order itself gets batches in which no key repeats ([`publish_in_key_order`]); every
//! batch's outcomes are checked ([`in_key_order`]).

use std::collections::HashSet;

use super::{key_runs, BatchError, Outcome, PublisherBackend};
use crate::event::OutboxEvent;

/// Publishes `events` through a backend that does not keep key order itself: in runs in which
/// no key repeats, one call each, the events of a key that failed in an earlier run answered
/// [`Outcome::NotSent`] without being sent. An outage after the first run defers the rest.
pub fn publish_in_key_order(
    backend: &mut dyn PublisherBackend,
    events: &[OutboxEvent],
) -> Result<Vec<Outcome>, BatchError> {
    publish_in_runs(backend, events, key_runs(events))
}

/// [`publish_in_key_order`] with the runs already cut ([`key_runs`] of `events`).
pub fn publish_in_runs(
    backend: &mut dyn PublisherBackend,
    events: &[OutboxEvent],
    runs: Vec<std::ops::Range<usize>>,
) -> Result<Vec<Outcome>, BatchError> {
    if runs.len() <= 1 {
        return backend.publish(events);
    }
    let mut outcome: Vec<Outcome> = Vec::with_capacity(events.len());
    let mut failed: HashSet<&str> = HashSet::new();
    for run in runs {
        let slice = &events[run.clone()];
        let held: Vec<bool> = slice
            .iter()
            .map(|e| {
                e.partition_key
                    .as_deref()
                    .is_some_and(|k| failed.contains(k))
            })
            .collect();
        let to_send: Vec<OutboxEvent> = slice
            .iter()
            .zip(&held)
            .filter(|(_, &held)| !held)
            .map(|(e, _)| e.clone())
            .collect();
        let mut answers = if to_send.is_empty() {
            Vec::new().into_iter()
        } else {
            match backend.publish(&to_send) {
                Ok(answers) if answers.len() == to_send.len() => answers.into_iter(),
                Ok(answers) if outcome.is_empty() => {
                    return Err(miscounted(backend.name(), answers.len(), to_send.len()))
                }
                Ok(answers) => {
                    // Some runs went out: keep them, defer the rest.
                    let e = miscounted(backend.name(), answers.len(), to_send.len());
                    outcome.resize(events.len(), Outcome::Deferred(e.to_string()));
                    return Ok(outcome);
                }
                Err(e) if outcome.is_empty() => return Err(e),
                Err(e) => {
                    // Some runs went out: keep them, defer the rest.
                    outcome.resize(events.len(), Outcome::Deferred(e.reason().to_string()));
                    return Ok(outcome);
                }
            }
        };
        for (event, &held) in slice.iter().zip(&held) {
            let answer = if held {
                Outcome::NotSent
            } else {
                answers.next().unwrap_or(Outcome::NotSent)
            };
            if answer != Outcome::Delivered {
                failed.extend(event.partition_key.as_deref());
            }
            outcome.push(answer);
        }
    }
    Ok(outcome)
}

pub fn miscounted(backend: &str, answers: usize, events: usize) -> BatchError {
    BatchError::Unavailable(format!(
        "the {backend} backend answered {answers} outcomes for {events} events"
    ))
}

/// The backend's outcomes, checked: one per event, and once an event of a key is not delivered,
/// the key's later rejections are its consequence (their stream refused them too), answered
/// [`Outcome::NotSent`] rather than counted as attempts of their own. A later event of the key
/// that was delivered anyway broke the key's order: that key comes back, for the log.
pub fn in_key_order(
    backend: &str,
    events: &[OutboxEvent],
    mut outcome: Vec<Outcome>,
) -> Result<(Vec<Outcome>, Option<String>), BatchError> {
    if outcome.len() != events.len() {
        return Err(miscounted(backend, outcome.len(), events.len()));
    }
    if outcome.iter().all(|o| *o == Outcome::Delivered) {
        return Ok((outcome, None));
    }
    let mut broken = None;
    let mut failed: HashSet<&str> = HashSet::new();
    for (event, result) in events.iter().zip(outcome.iter_mut()) {
        let Some(key) = event.partition_key.as_deref() else {
            continue;
        };
        if !failed.contains(key) {
            if *result != Outcome::Delivered {
                failed.insert(key);
            }
            continue;
        }
        match result {
            Outcome::Rejected(_) => *result = Outcome::NotSent,
            Outcome::Delivered => broken = Some(key.to_string()),
            Outcome::Deferred(_) | Outcome::NotSent => {}
        }
    }
    Ok((outcome, broken))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyed(k: Option<&str>) -> OutboxEvent {
        OutboxEvent {
            partition_key: k.map(Into::into),
            ..Default::default()
        }
    }

    /// A backend that does not keep key order: rejects the events whose `subject` is "bad",
    /// and records each batch it is given.
    struct Picky {
        batches: Vec<usize>,
        down_after: Option<usize>,
    }

    impl PublisherBackend for Picky {
        fn name(&self) -> &'static str {
            "picky"
        }
        fn publish(&mut self, events: &[OutboxEvent]) -> Result<Vec<Outcome>, BatchError> {
            if self.down_after == Some(self.batches.len()) {
                return Err(BatchError::Unavailable("down".into()));
            }
            self.batches.push(events.len());
            Ok(events
                .iter()
                .map(|e| match e.subject.as_deref() {
                    Some("bad") => Outcome::Rejected("no".into()),
                    _ => Outcome::Delivered,
                })
                .collect())
        }
        fn health_check(&mut self) -> Result<(), BatchError> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_key_is_held_by_the_relay_not_the_backend() {
        let bad = OutboxEvent {
            subject: Some("bad".into()),
            ..keyed(Some("a"))
        };
        let events = vec![
            bad,
            keyed(Some("b")),
            keyed(Some("a")),
            keyed(None),
            keyed(Some("a")),
        ];
        let mut backend = Picky {
            batches: Vec::new(),
            down_after: None,
        };
        let outcome = publish_in_key_order(&mut backend, &events).expect("published");
        assert!(matches!(outcome[0], Outcome::Rejected(_)));
        assert_eq!(outcome[1], Outcome::Delivered);
        assert_eq!(outcome[2], Outcome::NotSent, "held behind the rejected one");
        assert_eq!(outcome[3], Outcome::Delivered);
        assert_eq!(outcome[4], Outcome::NotSent);
        // Runs [a b], [a none], [a]: the held events of a are never sent.
        assert_eq!(backend.batches, vec![2, 1]);
    }

    #[test]
    fn an_outage_after_some_runs_defers_the_rest() {
        let events = vec![keyed(Some("a")), keyed(Some("a")), keyed(Some("a"))];
        let mut backend = Picky {
            batches: Vec::new(),
            down_after: Some(1),
        };
        let outcome = publish_in_key_order(&mut backend, &events).expect("partly published");
        assert_eq!(outcome[0], Outcome::Delivered);
        assert!(matches!(outcome[1], Outcome::Deferred(_)));
        assert!(matches!(outcome[2], Outcome::Deferred(_)));
        let mut down = Picky {
            batches: Vec::new(),
            down_after: Some(0),
        };
        assert!(publish_in_key_order(&mut down, &events).is_err());
    }

    #[test]
    fn later_rejections_of_a_key_are_not_attempts_of_their_own() {
        let events = vec![keyed(Some("a")), keyed(Some("a")), keyed(None), keyed(None)];
        let rejected = || Outcome::Rejected("WRONGTYPE".into());
        let (outcome, broken) = in_key_order("t", &events, vec![rejected(); 4]).expect("checked");
        assert_eq!(broken, None);
        assert!(matches!(outcome[0], Outcome::Rejected(_)));
        assert_eq!(outcome[1], Outcome::NotSent);
        // Without a key, each event fails on its own.
        assert!(matches!(outcome[2], Outcome::Rejected(_)));
        assert!(matches!(outcome[3], Outcome::Rejected(_)));
        assert!(in_key_order("t", &events, vec![Outcome::Delivered]).is_err());
        let out_of_order = vec![
            rejected(),
            Outcome::Delivered,
            Outcome::Delivered,
            Outcome::Delivered,
        ];
        let (_, broken) = in_key_order("t", &events, out_of_order).expect("checked");
        assert_eq!(broken.as_deref(), Some("a"), "said, for the log");
    }
}
