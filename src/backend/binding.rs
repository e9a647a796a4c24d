//! What the CloudEvents protocol bindings share: an event's context attributes as name/value
//! pairs for a binary-mode message (HTTP and NATS headers, AMQP application properties, MQTT
//! user properties), each binding choosing the names' prefix and how values are escaped.

use cloudevents::event::SpecVersion;
use cloudevents::message::{BinaryDeserializer, BinarySerializer, MessageAttributeValue};
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};

use crate::event::OutboxEvent;

/// Content type of a structured-mode message (the CloudEvents JSON format).
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// How a binding lays one event out in one message: the CloudEvents content modes (spec 1.0,
/// "Message"), named by the `message_mode` option ([`super::Options::message_mode`]). Each
/// backend's docs say where its binding puts the attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The attributes in the message's metadata (headers, properties, stream fields), the
    /// data's content type as the message's own, the data as the payload, byte for byte.
    #[default]
    Binary,
    /// The whole event as one [`STRUCTURED_CONTENT_TYPE`] document.
    Structured,
}

/// Characters of an attribute value a header carries percent-encoded: outside printable ASCII,
/// space, `"` and `%` (HTTP binding 3.1.3.2, which the NATS binding follows). Non-ASCII is
/// always encoded.
const HEADER_VALUE: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%');

/// How a binding writes an attribute's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    /// Percent-encoded where HTTP headers need it (HTTP, NATS).
    PercentEncoded,
    /// As they are: the transport carries UTF-8 strings (AMQP, MQTT 5).
    Plain,
}

/// The attributes of `event` but `datacontenttype` (a binding carries it as the message's own
/// content type), `specversion` first: `(prefix + name, value)`. Errors say why the event
/// makes no valid CloudEvent.
pub fn attributes(
    event: &OutboxEvent,
    prefix: &'static str,
    values: Values,
) -> Result<Vec<(String, String)>, String> {
    let writer = PairWriter {
        prefix,
        values,
        pairs: Vec::new(),
    };
    let writer = event
        .attributes()
        .map_err(|e| e.to_string())?
        .deserialize_binary(writer)
        .map_err(|e| e.to_string())?;
    Ok(writer.pairs)
}

struct PairWriter {
    prefix: &'static str,
    values: Values,
    pairs: Vec<(String, String)>,
}

impl PairWriter {
    fn add(mut self, name: &str, value: impl std::fmt::Display) -> Self {
        let value = value.to_string();
        let value = match self.values {
            Values::PercentEncoded => utf8_percent_encode(&value, HEADER_VALUE).to_string(),
            Values::Plain => value,
        };
        self.pairs.push((format!("{}{name}", self.prefix), value));
        self
    }
}

impl BinarySerializer<PairWriter> for PairWriter {
    fn set_spec_version(self, spec_version: SpecVersion) -> cloudevents::message::Result<Self> {
        Ok(self.add("specversion", spec_version.as_str()))
    }

    fn set_attribute(
        self,
        name: &str,
        value: MessageAttributeValue,
    ) -> cloudevents::message::Result<Self> {
        Ok(if name == "datacontenttype" {
            self
        } else {
            self.add(name, value)
        })
    }

    fn set_extension(
        self,
        name: &str,
        value: MessageAttributeValue,
    ) -> cloudevents::message::Result<Self> {
        Ok(self.add(name, value))
    }

    fn end_with_data(self, _bytes: Vec<u8>) -> cloudevents::message::Result<PairWriter> {
        Ok(self)
    }

    fn end(self) -> cloudevents::message::Result<PairWriter> {
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_percent_encoded_where_headers_need_it() {
        let event = OutboxEvent {
            id: "1".into(),
            ty: "t".into(),
            source: "/s".into(),
            subject: Some("Zürich 100%".into()),
            time: "2026-01-01T00:00:00Z".into(),
            datacontenttype: "application/json".into(),
            ..Default::default()
        };
        let find = |pairs: &[(String, String)], name: &str| {
            pairs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let headers = attributes(&event, "ce-", Values::PercentEncoded).expect("valid");
        assert_eq!(
            find(&headers, "ce-subject").as_deref(),
            Some("Z%C3%BCrich%20100%25")
        );
        assert_eq!(headers[0], ("ce-specversion".into(), "1.0".into()));
        assert_eq!(find(&headers, "ce-datacontenttype"), None);
        let plain = attributes(&event, "cloudEvents_", Values::Plain).expect("valid");
        assert_eq!(
            find(&plain, "cloudEvents_subject").as_deref(),
            Some("Zürich 100%")
        );
    }
}
