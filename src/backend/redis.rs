//! Redis Streams backend: one `XADD` per event, a whole batch in one pipelined round trip.
//! The entry layout follows the CloudEvents Kafka binding (binary mode) or carries the whole
//! event as JSON (structured mode); the SDK's message serializers produce both.

use cloudevents::event::SpecVersion;
use cloudevents::message::{
    BinaryDeserializer, BinarySerializer, MessageAttributeValue, StructuredDeserializer,
    StructuredSerializer,
};
use redis::{Client, Connection, RedisError};

use super::{BackendConfig, BackendError, BatchOutcome, MessageMode, PublisherBackend};
use crate::event::OutboxEvent;

/// Content type of a structured-mode entry.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// Field names and values of one stream entry, in the order they are written.
pub type Fields = Vec<(String, Vec<u8>)>;

pub struct RedisStreamBackend {
    client: Client,
    connection: Option<Connection>,
    config: BackendConfig,
}

impl RedisStreamBackend {
    pub fn from_config(config: &BackendConfig) -> Result<Box<dyn PublisherBackend>, BackendError> {
        // The URL may hold a password: the error says what is wrong without repeating it.
        let client = Client::open(config.redis_url.as_str()).map_err(|e| {
            BackendError::Config(format!(
                "broadcaster.redis_url is not a valid Redis URL ({:?}); expected redis://[user:password@]host[:port][/db]",
                e.kind()
            ))
        })?;
        if config.stream.is_empty() {
            return Err(BackendError::Config(
                "the default stream name is empty".into(),
            ));
        }
        Ok(Box::new(RedisStreamBackend {
            client,
            connection: None,
            config: config.clone(),
        }))
    }

    fn connection(&mut self) -> Result<&mut Connection, BackendError> {
        if self.connection.is_none() {
            let timeout = Some(self.config.timeout);
            let connection = self
                .client
                .get_connection_with_timeout(self.config.timeout)
                .and_then(|c| {
                    c.set_read_timeout(timeout)?;
                    c.set_write_timeout(timeout)?;
                    Ok(c)
                })
                .map_err(classify)?;
            self.connection = Some(connection);
        }
        self.connection
            .as_mut()
            .ok_or_else(|| BackendError::Unavailable("no connection".into()))
    }

    /// Runs `f` on the connection; an outage drops the connection so the next call reconnects.
    fn with_connection<T>(
        &mut self,
        f: impl FnOnce(&mut Connection) -> Result<T, RedisError>,
    ) -> Result<T, BackendError> {
        let result = f(self.connection()?).map_err(classify);
        if matches!(result, Err(BackendError::Unavailable(_))) {
            self.connection = None;
        }
        result
    }

    fn xadd(&self, event: &OutboxEvent) -> Result<redis::Cmd, BackendError> {
        let fields = encode(event, self.config.mode)?;
        let stream = event.stream.as_deref().unwrap_or(&self.config.stream);
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream);
        if self.config.maxlen > 0 {
            cmd.arg("MAXLEN").arg("~").arg(self.config.maxlen);
        }
        cmd.arg("*");
        for (name, value) in fields {
            cmd.arg(name).arg(value);
        }
        Ok(cmd)
    }
}

impl PublisherBackend for RedisStreamBackend {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn publish(&mut self, event: &OutboxEvent) -> Result<(), BackendError> {
        let cmd = self.xadd(event)?;
        self.with_connection(|c| cmd.query::<redis::Value>(c).map(drop))
    }

    fn publish_batch(&mut self, events: &[OutboxEvent]) -> Result<BatchOutcome, BackendError> {
        let mut outcome: BatchOutcome = Vec::with_capacity(events.len());
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        // Events that can't be encoded are answered here and never sent.
        let mut sent = Vec::with_capacity(events.len());
        for (i, event) in events.iter().enumerate() {
            match self.xadd(event) {
                Ok(cmd) => {
                    pipe.add_command(cmd);
                    sent.push(i);
                    outcome.push(Ok(()));
                }
                Err(e) => outcome.push(Err(e)),
            }
        }
        if sent.is_empty() {
            return Ok(outcome);
        }
        let replies: Vec<redis::RedisResult<redis::Value>> =
            self.with_connection(|c| pipe.query(c))?;
        if replies.len() != sent.len() {
            self.connection = None;
            return Err(BackendError::Unavailable(format!(
                "expected {} replies from the pipeline, got {}",
                sent.len(),
                replies.len()
            )));
        }
        for (i, reply) in sent.into_iter().zip(replies) {
            if let Err(e) = reply {
                outcome[i] = Err(classify(e));
            }
        }
        Ok(outcome)
    }

    fn health_check(&mut self) -> Result<(), BackendError> {
        self.with_connection(|c| redis::cmd("PING").query::<String>(c).map(drop))
    }
}

/// Outages (the broker can't be reached, is loading, read-only, out of memory, refuses our
/// credentials) are not the event's fault; anything else the server answers is a rejection.
fn classify(e: RedisError) -> BackendError {
    const OUTAGE_CODES: &[&str] = &[
        "LOADING",
        "BUSY",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "MASTERDOWN",
        "READONLY",
        "OOM",
        "NOAUTH",
        "WRONGPASS",
        "NOPERM",
    ];
    let outage = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.kind() == redis::ErrorKind::AuthenticationFailed
        || e.code().is_some_and(|code| OUTAGE_CODES.contains(&code));
    if outage {
        BackendError::Unavailable(e.to_string())
    } else {
        BackendError::Rejected(e.to_string())
    }
}

/// The fields of the stream entry for `event`.
pub fn encode(event: &OutboxEvent, mode: MessageMode) -> Result<Fields, BackendError> {
    let cloud_event = event.to_cloud_event()?;
    let result = match mode {
        MessageMode::Binary => cloud_event.deserialize_binary(EntryWriter::default()),
        MessageMode::Structured => cloud_event.deserialize_structured(EntryWriter::default()),
    };
    result.map_err(|e| BackendError::Rejected(format!("cannot serialize the CloudEvent: {e}")))
}

/// Receives the event from the SDK's message deserializers and lays it out as entry fields.
#[derive(Default)]
struct EntryWriter {
    fields: Fields,
}

impl EntryWriter {
    fn push(mut self, name: String, value: impl Into<Vec<u8>>) -> Self {
        self.fields.push((name, value.into()));
        self
    }
}

impl BinarySerializer<Fields> for EntryWriter {
    fn set_spec_version(self, spec_version: SpecVersion) -> cloudevents::message::Result<Self> {
        Ok(self.push("ce_specversion".into(), spec_version.as_str()))
    }

    fn set_attribute(
        self,
        name: &str,
        value: MessageAttributeValue,
    ) -> cloudevents::message::Result<Self> {
        // Like the Kafka binding: the data's content type is the message's content type.
        let field = if name == "datacontenttype" {
            "content-type".to_string()
        } else {
            format!("ce_{name}")
        };
        Ok(self.push(field, value.to_string()))
    }

    fn set_extension(
        self,
        name: &str,
        value: MessageAttributeValue,
    ) -> cloudevents::message::Result<Self> {
        Ok(self.push(format!("ce_{name}"), value.to_string()))
    }

    fn end_with_data(self, bytes: Vec<u8>) -> cloudevents::message::Result<Fields> {
        Ok(self.push("data".into(), bytes).fields)
    }

    fn end(self) -> cloudevents::message::Result<Fields> {
        Ok(self.fields)
    }
}

impl StructuredSerializer<Fields> for EntryWriter {
    fn set_structured_event(self, bytes: Vec<u8>) -> cloudevents::message::Result<Fields> {
        Ok(self
            .push("content-type".into(), STRUCTURED_CONTENT_TYPE)
            .push("cloudevent".into(), bytes)
            .fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event() -> OutboxEvent {
        OutboxEvent {
            id: "7d2c5bd4-4f7e-4a53-8d4c-5d1d7a1c0e11".into(),
            ty: "order.created".into(),
            source: "/shop".into(),
            subject: Some("order-1".into()),
            time: "2026-11-27T07:00:00Z".into(),
            datacontenttype: "application/json".into(),
            dataschema: None,
            data: Some(json!({"n": 1})),
            partition_key: Some("c-1".into()),
            extensions: json!({"tenant": "acme"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            stream: None,
        }
    }

    fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a str> {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    #[test]
    fn binary_mode_has_one_field_per_attribute() {
        let fields = encode(&event(), MessageMode::Binary).expect("encodes");
        assert_eq!(field(&fields, "ce_specversion"), Some("1.0"));
        assert_eq!(
            field(&fields, "ce_id"),
            Some("7d2c5bd4-4f7e-4a53-8d4c-5d1d7a1c0e11")
        );
        assert_eq!(field(&fields, "ce_source"), Some("/shop"));
        assert_eq!(field(&fields, "ce_type"), Some("order.created"));
        assert_eq!(field(&fields, "ce_time"), Some("2026-11-27T07:00:00+00:00"));
        assert_eq!(field(&fields, "ce_subject"), Some("order-1"));
        assert_eq!(field(&fields, "ce_partitionkey"), Some("c-1"));
        assert_eq!(field(&fields, "ce_tenant"), Some("acme"));
        assert_eq!(field(&fields, "content-type"), Some("application/json"));
        assert_eq!(field(&fields, "data"), Some(r#"{"n":1}"#));
        assert_eq!(field(&fields, "ce_dataschema"), None);
        assert_eq!(field(&fields, "ce_datacontenttype"), None);
    }

    #[test]
    fn structured_mode_is_one_cloudevents_json_field() {
        let fields = encode(&event(), MessageMode::Structured).expect("encodes");
        assert_eq!(fields.len(), 2);
        assert_eq!(
            field(&fields, "content-type"),
            Some(STRUCTURED_CONTENT_TYPE)
        );
        let body = field(&fields, "cloudevent").expect("cloudevent field");
        let parsed: cloudevents::Event = serde_json::from_str(body).expect("SDK parses it");
        assert_eq!(parsed, event().to_cloud_event().expect("valid"));
    }

    #[test]
    fn bad_url_is_a_config_error_without_the_secret() {
        let config = BackendConfig {
            redis_url: "http://user:s3cret@host".into(),
            stream: "s".into(),
            ..Default::default()
        };
        let err = RedisStreamBackend::from_config(&config)
            .err()
            .expect("refused");
        assert!(matches!(err, BackendError::Config(_)));
        assert!(!err.to_string().contains("s3cret"));
    }

    #[test]
    fn unreachable_broker_is_unavailable_not_rejected() {
        // Port 1 on loopback: nothing listens there, the connect is refused at once.
        let config = BackendConfig {
            redis_url: "redis://127.0.0.1:1".into(),
            stream: "s".into(),
            timeout: std::time::Duration::from_millis(500),
            ..Default::default()
        };
        let mut backend = RedisStreamBackend::from_config(&config).expect("valid config");
        assert!(matches!(
            backend.health_check(),
            Err(BackendError::Unavailable(_))
        ));
        assert!(matches!(
            backend.publish_batch(&[event()]),
            Err(BackendError::Unavailable(_))
        ));
    }
}
