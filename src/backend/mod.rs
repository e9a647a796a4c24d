//! Where events go: the `PublisherBackend` trait, its error type, and the registry that builds a
//! backend by name. Plain Rust: backends never touch Postgres.
//!
//! Adding a backend: one file in this folder implementing the trait, and one line in
//! [`REGISTRY`].

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::event::{EventError, OutboxEvent};

pub mod file;
pub mod redis;

/// Every backend the worker can be configured with (`broadcaster.backend`), by name.
pub const REGISTRY: &[(&str, Constructor)] = &[
    ("redis", redis::RedisStreamBackend::from_config),
    ("file", file::FileBackend::from_config),
];

pub type Constructor = fn(&BackendConfig) -> Result<Box<dyn PublisherBackend>, BackendError>;

/// Builds the backend named `name`.
pub fn build(
    name: &str,
    config: &BackendConfig,
) -> Result<Box<dyn PublisherBackend>, BackendError> {
    REGISTRY
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, construct)| construct(config))
        .unwrap_or_else(|| {
            let known: Vec<&str> = REGISTRY.iter().map(|(n, _)| *n).collect();
            Err(BackendError::Config(format!(
                "unknown backend {name:?}; known backends: {}",
                known.join(", ")
            )))
        })
}

/// How an event is laid out in the broker's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MessageMode {
    /// One field per attribute (`ce_id`, `ce_type`, ...), `content-type` and `data`: the
    /// CloudEvents Kafka binding's binary mode.
    #[default]
    Binary,
    /// One field holding the whole event as `application/cloudevents+json`.
    Structured,
}

/// Everything a backend may be configured with. The worker fills it from the `broadcaster.*`
/// settings; each backend reads the fields it needs.
#[derive(Clone, Default)]
pub struct BackendConfig {
    /// Secret: may hold a password. Never logged, never shown in an error.
    pub redis_url: String,
    /// CA certificate (PEM file) for `rediss://`; empty: the system's authorities.
    pub redis_tls_ca_file: String,
    /// Client certificate and its key (PEM files) for mutual TLS; empty: none.
    pub redis_tls_cert_file: String,
    pub redis_tls_key_file: String,
    /// Every stream written to starts with this (`broadcaster.stream_prefix`); empty: any.
    pub stream_prefix: String,
    /// Stream for events whose `stream` column is NULL.
    pub stream: String,
    /// Approximate `MAXLEN` for `XADD`; 0 leaves streams untrimmed.
    pub maxlen: u64,
    pub mode: MessageMode,
    /// Bound on every network operation (connect, read, write).
    pub timeout: Duration,
    /// Target of the `file` backend.
    pub file_path: String,
    /// Largest encoded event a backend sends; larger ones are rejected. 0: no limit.
    pub max_event_size: usize,
    /// Names this relay to brokers that de-duplicate per producer (Redis `XADD IDMP`).
    pub producer_id: String,
}

impl std::fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConfig")
            .field("redis_url", &"<hidden>")
            .field("redis_tls_ca_file", &self.redis_tls_ca_file)
            .field("redis_tls_cert_file", &self.redis_tls_cert_file)
            .field("redis_tls_key_file", &self.redis_tls_key_file)
            .field("stream_prefix", &self.stream_prefix)
            .field("stream", &self.stream)
            .field("maxlen", &self.maxlen)
            .field("mode", &self.mode)
            .field("timeout", &self.timeout)
            .field("file_path", &self.file_path)
            .field("max_event_size", &self.max_event_size)
            .field("producer_id", &self.producer_id)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The broker can't be reached or isn't serving: not the event's fault. The worker keeps
    /// the events pending and retries with backoff, without counting an attempt against them.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker refused this one event. It counts as a failed attempt for that event.
    #[error("broker rejected the event: {0}")]
    Rejected(String),
    /// Not attempted: an earlier event of the same partition key failed in this batch. The
    /// event stays pending, untouched, behind that one.
    #[error("held behind an earlier event of its partition key")]
    Held,
    /// The row does not make a valid CloudEvent.
    #[error(transparent)]
    Event(#[from] EventError),
    /// The backend's settings are wrong; fix `broadcaster.*` and reload.
    #[error("backend misconfigured: {0}")]
    Config(String),
}

impl BackendError {
    /// Whether the failure belongs to the broker (retry the whole batch later) rather than to
    /// one event.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, BackendError::Unavailable(_) | BackendError::Config(_))
    }
}

/// Per-event outcomes of a batch, in the order the events were given.
pub type BatchOutcome = Vec<Result<(), BackendError>>;

/// The partition keys that failed earlier in a batch: their later events must be held.
#[derive(Default)]
pub struct HeldKeys<'a>(HashSet<&'a str>);

impl<'a> HeldKeys<'a> {
    pub fn holds(&self, event: &OutboxEvent) -> bool {
        event
            .partition_key
            .as_deref()
            .is_some_and(|k| self.0.contains(k))
    }

    pub fn fail(&mut self, event: &'a OutboxEvent) {
        self.0.extend(event.partition_key.as_deref());
    }
}

/// A destination for committed events.
pub trait PublisherBackend {
    /// Short name for logs and `broadcaster_health`'s reports.
    fn name(&self) -> &'static str;

    /// Delivers one event. Return [`BackendError::Unavailable`] when the broker is down.
    fn publish(&mut self, event: &OutboxEvent) -> Result<(), BackendError>;

    /// Delivers events in order. `Err` means nothing can be said about the batch (the broker is
    /// unavailable) and it will be retried whole; `Ok` carries one outcome per event. Once an
    /// event fails, the later events of its partition key must not be sent: answer them
    /// [`BackendError::Held`], so a key's order survives a rejection. The default publishes one
    /// at a time; backends override it to batch (e.g. one round trip).
    fn publish_batch(&mut self, events: &[OutboxEvent]) -> Result<BatchOutcome, BackendError> {
        publish_each(self, events)
    }

    /// [`PublisherBackend::publish_batch`], calling `meanwhile` while the broker works on the
    /// batch (after sending it, before reading the reply), so the caller can claim the next one
    /// and hand it to the [`Prepare`] it is given. What that returns comes back here with those
    /// same events as `prepared`, and saves encoding them again. The default calls `meanwhile`
    /// after publishing and prepares nothing; a backend that sends and receives in two steps
    /// overrides it.
    fn publish_batch_overlapped(
        &mut self,
        events: &[OutboxEvent],
        prepared: Option<Prepared>,
        meanwhile: &mut dyn FnMut(&mut dyn Prepare),
    ) -> Result<BatchOutcome, BackendError> {
        drop(prepared);
        let outcome = self.publish_batch(events);
        meanwhile(&mut NothingToPrepare);
        outcome
    }

    /// Cheap check that the broker is reachable and serving.
    fn health_check(&mut self) -> Result<(), BackendError>;
}

/// Encodes a batch ahead of its turn: see [`PublisherBackend::publish_batch_overlapped`].
pub trait Prepare {
    /// The backend's encoding of `events`, to be handed back with them; None when it has none.
    /// The events are shared, so that a backend may encode them on a thread of its own (never
    /// calling into Postgres from there).
    fn prepare(&mut self, events: &Arc<Vec<OutboxEvent>>) -> Option<Prepared>;
}

/// A batch encoded ahead by a backend: opaque to the relay, which only hands it back.
pub struct Prepared(pub Box<dyn std::any::Any>);

/// The [`Prepare`] of backends that encode as they send.
pub struct NothingToPrepare;

impl Prepare for NothingToPrepare {
    fn prepare(&mut self, _: &Arc<Vec<OutboxEvent>>) -> Option<Prepared> {
        None
    }
}

/// Publishes events one at a time, holding a key's later events after one of them failed. The
/// default batch, and the relay's fallback when a backend refuses a batch as a whole.
pub fn publish_each<B: PublisherBackend + ?Sized>(
    backend: &mut B,
    events: &[OutboxEvent],
) -> Result<BatchOutcome, BackendError> {
    each_in_key_order(events, |event| backend.publish(event))
}

/// Runs `send` on each event in order, answering [`BackendError::Held`] for a key's events after
/// one of them failed; stops at the first outage. The per-key rule every batch must follow, for
/// backends that send one event at a time.
pub fn each_in_key_order(
    events: &[OutboxEvent],
    mut send: impl FnMut(&OutboxEvent) -> Result<(), BackendError>,
) -> Result<BatchOutcome, BackendError> {
    let mut outcome = Vec::with_capacity(events.len());
    let mut held = HeldKeys::default();
    for event in events {
        if held.holds(event) {
            outcome.push(Err(BackendError::Held));
            continue;
        }
        match send(event) {
            Err(e) if e.is_unavailable() => return Err(e),
            Err(e) => {
                held.fail(event);
                outcome.push(Err(e));
            }
            Ok(()) => outcome.push(Ok(())),
        }
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_backend_lists_the_known_ones() {
        let err = build("kafka", &BackendConfig::default())
            .err()
            .expect("unknown backend is refused");
        let msg = err.to_string();
        assert!(msg.contains("\"kafka\""), "{msg}");
        assert!(msg.contains("redis, file"), "{msg}");
    }

    #[test]
    fn debug_never_shows_the_redis_url() {
        let config = BackendConfig {
            redis_url: "redis://user:s3cret@localhost".into(),
            ..Default::default()
        };
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    struct Flaky {
        calls: usize,
        fail_at: usize,
        unavailable: bool,
    }

    impl PublisherBackend for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn publish(&mut self, _: &OutboxEvent) -> Result<(), BackendError> {
            self.calls += 1;
            if self.calls == self.fail_at {
                if self.unavailable {
                    return Err(BackendError::Unavailable("down".into()));
                }
                return Err(BackendError::Rejected("no".into()));
            }
            Ok(())
        }
        fn health_check(&mut self) -> Result<(), BackendError> {
            Ok(())
        }
    }

    #[test]
    fn default_batch_holds_a_failed_key() {
        let keyed = |k: &str| OutboxEvent {
            partition_key: Some(k.into()),
            ..Default::default()
        };
        let events = vec![keyed("a"), keyed("b"), keyed("a"), keyed("b")];
        let mut rejecting = Flaky {
            calls: 0,
            fail_at: 1,
            unavailable: false,
        };
        let outcome = rejecting.publish_batch(&events).expect("batch ran");
        assert!(matches!(outcome[0], Err(BackendError::Rejected(_))));
        assert!(outcome[1].is_ok());
        assert!(matches!(outcome[2], Err(BackendError::Held)));
        assert!(outcome[3].is_ok());
        assert_eq!(rejecting.calls, 3, "the held event is never sent");
    }

    #[test]
    fn default_batch_reports_each_event_and_stops_on_outage() {
        let events = vec![OutboxEvent::default(); 3];
        let mut rejecting = Flaky {
            calls: 0,
            fail_at: 2,
            unavailable: false,
        };
        let outcome = rejecting.publish_batch(&events).expect("batch ran");
        assert_eq!(outcome.len(), 3);
        assert!(outcome[0].is_ok() && outcome[1].is_err() && outcome[2].is_ok());

        let mut down = Flaky {
            calls: 0,
            fail_at: 2,
            unavailable: true,
        };
        assert!(down.publish_batch(&events).is_err());
        assert_eq!(down.calls, 2, "stops at the first outage");
    }
}
