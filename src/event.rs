//! The event as it sits in `broadcaster_outbox`, its validation rules, and its CloudEvents 1.0
//! form. Plain Rust: no Postgres needed to build, validate or test an event.

use std::borrow::Cow;

use cloudevents::event::{AttributesWriter, ExtensionValue, TryIntoUrl};
use cloudevents::{Data, Event, EventBuilder, EventBuilderV10};
use serde_json::{Map, Value};

/// Longest extension attribute name the CloudEvents spec recommends.
pub const MAX_EXTENSION_NAME_LEN: usize = 20;
/// Most extension attributes an event may carry.
pub const MAX_EXTENSIONS: usize = 100;

/// Names an extension may not take: the CloudEvents core attributes, and `partitionkey`, which
/// comes from the `partition_key` column.
const RESERVED_NAMES: &[&str] = &[
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
    "data_base64",
    "partitionkey",
];

/// Why an event was refused. Each variant names the column at fault so the SQL layer can map it
/// to a SQLSTATE and the user can fix the row.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("{0} must not be empty")]
    Empty(&'static str),
    #[error("source {0:?} is not a URI-reference (RFC 3986)")]
    InvalidSource(String),
    #[error("dataschema {0:?} is not an absolute URI")]
    InvalidDataschema(String),
    #[error("extensions must be a JSON object of attribute name to value, got {0}")]
    ExtensionsNotObject(&'static str),
    #[error(
        "extension name {0:?} is invalid: use 1 to 20 lowercase letters a-z or digits 0-9 (CloudEvents naming rule)"
    )]
    InvalidExtensionName(String),
    #[error("extension name {0:?} collides with a CloudEvents core attribute")]
    ReservedExtensionName(String),
    #[error("an event may carry at most {MAX_EXTENSIONS} extension attributes, got {0}")]
    TooManyExtensions(usize),
    #[error("extension {0:?} must be a string, a 32-bit integer or a boolean (CloudEvents types)")]
    InvalidExtensionValue(String),
    #[error("data is not JSON every consumer can read: {0}")]
    InvalidData(String),
    #[error(
        "{column} holds {character:?} at character {at}: CloudEvents String attributes must not hold control characters (U+0000-U+001F, U+007F-U+009F) or noncharacters"
    )]
    InvalidCharacter {
        column: &'static str,
        character: char,
        at: usize,
    },
    #[error(
        "the event is {size} bytes (its data and attribute values), above broadcaster.max_event_size ({max} bytes)"
    )]
    TooLarge { size: usize, max: usize },
    #[error("stream {stream:?} does not start with broadcaster.stream_prefix {prefix:?}")]
    StreamOutsidePrefix { stream: String, prefix: String },
    #[error("time {0:?} is not an RFC 3339 timestamp")]
    InvalidTime(String),
    #[error("the event cannot be built as a CloudEvent: {0}")]
    Build(String),
}

impl EventError {
    /// The outbox column (or function argument) at fault.
    pub fn column(&self) -> &'static str {
        match self {
            EventError::Empty(column) => column,
            EventError::InvalidSource(_) => "source",
            EventError::InvalidDataschema(_) => "dataschema",
            EventError::ExtensionsNotObject(_)
            | EventError::InvalidExtensionName(_)
            | EventError::ReservedExtensionName(_)
            | EventError::InvalidExtensionValue(_)
            | EventError::TooManyExtensions(_) => "extensions",
            EventError::InvalidTime(_) => "time",
            EventError::InvalidData(_) | EventError::TooLarge { .. } => "data",
            EventError::InvalidCharacter { column, .. } => column,
            EventError::StreamOutsidePrefix { .. } => "stream",
            EventError::Build(_) => "event",
        }
    }
}

/// An outbox row's columns as the row trigger reads them (borrowed; `time` is checked apart),
/// NULL as None. [`EventRow::validate`] is every check the trigger makes.
#[derive(Debug, Default, Clone, Copy)]
pub struct EventRow<'a> {
    pub ty: Option<&'a str>,
    pub source: Option<&'a str>,
    pub subject: Option<&'a str>,
    pub datacontenttype: Option<&'a str>,
    pub dataschema: Option<&'a str>,
    pub data: Option<&'a str>,
    pub extensions: Option<&'a Value>,
    pub stream: Option<&'a str>,
    pub partition_key: Option<&'a str>,
}

impl EventRow<'_> {
    /// Refuses what the relay could not send in either message mode: an event accepted here
    /// encodes (the `accepted_events_encode` property test in `backend/redis.rs`). NULLs pass:
    /// the column's NOT NULL or default answers for them. `max_event_size` in bytes, 0: none;
    /// `stream_prefix` as in [`validate_stream`].
    pub fn validate(&self, max_event_size: usize, stream_prefix: &str) -> Result<(), EventError> {
        if let Some(ty) = self.ty {
            validate_type(ty)?;
        }
        if let Some(source) = self.source {
            validate_source(source)?;
        }
        if let Some(subject) = self.subject {
            validate_string("subject", subject)?;
        }
        if let Some(content_type) = self.datacontenttype {
            validate_datacontenttype(content_type)?;
        }
        if let Some(schema) = self.dataschema {
            validate_dataschema(schema)?;
        }
        if let Some(data) = self.data {
            validate_data(data)?;
        }
        if let Some(extensions) = self.extensions {
            validate_extensions_value(extensions)?;
        }
        if let Some(stream) = self.stream {
            validate_stream(stream, stream_prefix)?;
        }
        if let Some(key) = self.partition_key {
            validate_partition_key(key)?;
        }
        let mut size = EventSize::new()
            .with(self.ty)
            .with(self.source)
            .with(self.subject)
            .with(self.datacontenttype)
            .with(self.dataschema)
            .with(self.data)
            .with(self.partition_key);
        if let Some(Value::Object(extensions)) = self.extensions {
            size = size.with_extensions(extensions);
        }
        size.check(max_event_size)
    }
}

/// One row of `broadcaster_outbox`, as the worker reads it. Field names follow the CloudEvents
/// attribute names; `stream` is a routing hint for the backend, not part of the event.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OutboxEvent {
    pub id: String,
    pub ty: String,
    pub source: String,
    pub subject: Option<String>,
    /// RFC 3339 timestamp.
    pub time: String,
    pub datacontenttype: String,
    pub dataschema: Option<String>,
    /// The event data as JSON text (the `data` json column: the text as the producer wrote it).
    /// Kept as text so a backend that sends bytes never parses it;
    /// [`OutboxEvent::to_cloud_event`] parses it.
    pub data: Option<String>,
    pub partition_key: Option<String>,
    pub extensions: Map<String, Value>,
    pub stream: Option<String>,
}

impl OutboxEvent {
    /// Bytes the event counts against `broadcaster.max_event_size` ([`EventSize`]).
    pub fn size(&self) -> EventSize {
        EventSize::new()
            .with(Some(&self.ty))
            .with(Some(&self.source))
            .with(self.subject.as_deref())
            .with(Some(&self.datacontenttype))
            .with(self.dataschema.as_deref())
            .with(self.data.as_deref())
            .with(self.partition_key.as_deref())
            .with_extensions(&self.extensions)
    }

    /// The event in the CloudEvents JSON format (structured mode), with the stored JSON text as
    /// its `data`, unchanged: the attributes through the SDK, the data spliced in, never parsed
    /// into a value and printed again (which would drop a duplicate key, reorder nothing but
    /// reformat everything). For a non-JSON content type the stored text is a JSON string, which
    /// is what the format carries for such data. The row trigger has checked it is JSON.
    pub fn structured_json(&self) -> Result<Vec<u8>, EventError> {
        let mut event = self.attributes()?;
        event.set_datacontenttype(Some(self.datacontenttype.as_str()));
        let mut json = serde_json::to_vec(&event).map_err(|e| EventError::Build(e.to_string()))?;
        if let Some(data) = &self.data {
            if json.pop() != Some(b'}') {
                return Err(EventError::Build("the SDK wrote no JSON object".into()));
            }
            json.extend_from_slice(b",\"data\":");
            json.extend_from_slice(data.as_bytes());
            json.push(b'}');
        }
        Ok(json)
    }

    /// The event in CloudEvents 1.0 form. This and the `PublisherBackend` trait are the whole
    /// contract a backend needs.
    pub fn to_cloud_event(&self) -> Result<Event, EventError> {
        let mut event = self.attributes()?;
        if let Some(text) = &self.data {
            let value: Value =
                serde_json::from_str(text).map_err(|e| EventError::InvalidData(e.to_string()))?;
            let data = match value {
                Value::String(s) if !is_json_content_type(&self.datacontenttype) => Data::String(s),
                other => Data::Json(other),
            };
            event.set_data(self.datacontenttype.as_str(), data);
        } else {
            // Every attribute the row has, even with no data.
            event.set_datacontenttype(Some(self.datacontenttype.as_str()));
        }
        Ok(event)
    }

    /// The event without its data: every context attribute but `datacontenttype`. With
    /// [`OutboxEvent::data_bytes`], what a binary-mode binding sends.
    pub fn attributes(&self) -> Result<Event, EventError> {
        validate_type(&self.ty)?;
        validate_source(&self.source)?;
        validate_extensions(&self.extensions)?;
        // Checked by the row trigger too; again here for a row written past it.
        if let Some(subject) = &self.subject {
            validate_string("subject", subject)?;
        }
        if let Some(key) = &self.partition_key {
            validate_partition_key(key)?;
        }
        validate_datacontenttype(&self.datacontenttype)?;

        let mut builder = EventBuilderV10::new()
            .id(self.id.as_str())
            .source(self.source.as_str())
            .ty(self.ty.as_str())
            .time(self.time.as_str());
        if let Some(subject) = &self.subject {
            builder = builder.subject(subject.as_str());
        }
        if let Some(key) = &self.partition_key {
            builder = builder.extension("partitionkey", key.as_str());
        }
        for (name, value) in &self.extensions {
            builder = builder.extension(name, extension_value(name, value)?);
        }
        let mut event = builder.build().map_err(|e| match e {
            cloudevents::event::EventBuilderError::ParseTimeError { .. } => {
                EventError::InvalidTime(self.time.clone())
            }
            other => EventError::Build(other.to_string()),
        })?;
        if let Some(schema) = &self.dataschema {
            // Parsed once, by the SDK's own URL type: the validation is the conversion.
            let url = schema
                .as_str()
                .into_url()
                .ok()
                .filter(|_| is_uri_reference(schema))
                .ok_or_else(|| EventError::InvalidDataschema(schema.clone()))?;
            event.set_dataschema(Some(url));
        }
        Ok(event)
    }

    /// The data as the bytes a message carries: the JSON text for JSON content types; for any
    /// other content type a JSON string is sent as the bare string (`text/plain`, XML, ...).
    /// Borrowed unless a string must be unquoted.
    pub fn data_bytes(&self) -> Result<Option<Cow<'_, [u8]>>, EventError> {
        let Some(text) = &self.data else {
            return Ok(None);
        };
        if text.starts_with('"') && !is_json_content_type(&self.datacontenttype) {
            let s: String =
                serde_json::from_str(text).map_err(|e| EventError::InvalidData(e.to_string()))?;
            return Ok(Some(Cow::Owned(s.into_bytes())));
        }
        Ok(Some(Cow::Borrowed(text.as_bytes())))
    }
}

/// `application/json`, `text/json`, and any `+json` suffix, parameters ignored.
pub fn is_json_content_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

fn extension_value(name: &str, value: &Value) -> Result<ExtensionValue, EventError> {
    match value {
        Value::String(s) => Ok(ExtensionValue::String(s.clone())),
        Value::Bool(b) => Ok(ExtensionValue::Boolean(*b)),
        // CloudEvents' Integer is 32-bit: larger ones some SDKs can't read back.
        Value::Number(n) => n
            .as_i64()
            .filter(|&i| i32::try_from(i).is_ok())
            .map(ExtensionValue::Integer)
            .ok_or_else(|| EventError::InvalidExtensionValue(name.to_owned())),
        _ => Err(EventError::InvalidExtensionValue(name.to_owned())),
    }
}

pub fn validate_type(ty: &str) -> Result<(), EventError> {
    if ty.is_empty() {
        return Err(EventError::Empty("type"));
    }
    validate_string("type", ty)
}

/// The CloudEvents String type (spec, "Type System"): no control characters (U+0000-U+001F,
/// U+007F-U+009F) and no noncharacters (U+FDD0-U+FDEF, and every code point ending in FFFE or
/// FFFF); surrogates can't occur in Rust text. A newline in `subject`, say, would not survive a
/// header-based binding.
pub fn validate_string(column: &'static str, value: &str) -> Result<(), EventError> {
    // Nearly every value is printable ASCII: one pass over the bytes decides.
    if value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Ok(());
    }
    match value.chars().enumerate().find(|&(_, c)| {
        let code = u32::from(c);
        c.is_control() || (0xFDD0..=0xFDEF).contains(&code) || code & 0xFFFE == 0xFFFE
    }) {
        Some((at, character)) => Err(EventError::InvalidCharacter {
            column,
            character,
            at: at + 1,
        }),
        None => Ok(()),
    }
}

/// `data` as every consumer can parse it: JSON text that serde_json, the relay's parser for
/// structured mode, reads. PostgreSQL's `json` type accepts a lone UTF-16 surrogate escape
/// (`"\ud83d"`) and nesting deeper than 128 levels; neither is JSON a strict parser reads back.
pub fn validate_data(data: &str) -> Result<(), EventError> {
    serde_json::from_str::<Readable>(data)
        .map(|_| ())
        .map_err(|e| EventError::InvalidData(e.to_string()))
}

/// Any JSON value, read through and kept nowhere. Unlike `serde::de::IgnoredAny`, which
/// serde_json skips without decoding its strings' escapes (a lone surrogate passes), every string
/// is decoded, as building the event's value decodes it. Borrowed when it has no escapes: no
/// allocation for most data.
struct Readable;

impl<'de> serde::Deserialize<'de> for Readable {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Readable)
    }
}

impl<'de> serde::de::Visitor<'de> for Readable {
    type Value = Readable;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Readable, E> {
        Ok(Readable)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Readable, E> {
        Ok(Readable)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Readable, E> {
        Ok(Readable)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Readable, E> {
        Ok(Readable)
    }
    fn visit_str<E>(self, _: &str) -> Result<Readable, E> {
        Ok(Readable)
    }
    fn visit_unit<E>(self) -> Result<Readable, E> {
        Ok(Readable)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Readable, A::Error> {
        while seq.next_element::<Readable>()?.is_some() {}
        Ok(Readable)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Readable, A::Error> {
        while map.next_entry::<Readable, Readable>()?.is_some() {}
        Ok(Readable)
    }
}

/// Bytes an event counts against `broadcaster.max_event_size`: its data and the text of every
/// attribute value (id, type, source, subject, time, datacontenttype, dataschema, partition
/// key, extensions' names and values), as [`EventSize`] adds them. The same count at the row
/// trigger and in the relay: an event the trigger accepts, the relay never refuses for its size.
#[derive(Default)]
pub struct EventSize(usize);

impl EventSize {
    /// The text of a uuid and of the relay's RFC 3339 time, which every event has.
    const ID_AND_TIME: usize = 36 + 27;

    pub fn new() -> EventSize {
        EventSize(Self::ID_AND_TIME)
    }

    pub fn with(mut self, value: Option<&str>) -> EventSize {
        self.0 += value.map_or(0, str::len);
        self
    }

    pub fn with_extensions(mut self, extensions: &Map<String, Value>) -> EventSize {
        for (name, value) in extensions {
            self.0 += name.len()
                + match value {
                    Value::String(s) => s.len(),
                    Value::Bool(b) => b.to_string().len(),
                    Value::Number(n) => n.to_string().len(),
                    // Refused by validation before it is counted.
                    Value::Null | Value::Array(_) | Value::Object(_) => 0,
                };
        }
        self
    }

    /// Refused when above `max` (0: no limit).
    pub fn check(self, max: usize) -> Result<(), EventError> {
        if max > 0 && self.0 > max {
            return Err(EventError::TooLarge { size: self.0, max });
        }
        Ok(())
    }
}

pub fn validate_source(source: &str) -> Result<(), EventError> {
    if source.is_empty() {
        return Err(EventError::Empty("source"));
    }
    if !is_uri_reference(source) {
        return Err(EventError::InvalidSource(source.to_owned()));
    }
    Ok(())
}

/// CloudEvents requires `dataschema` to be an absolute URI; the SDK parses it as a URL.
pub fn validate_dataschema(schema: &str) -> Result<(), EventError> {
    if !is_uri_reference(schema) || schema.into_url().is_err() {
        return Err(EventError::InvalidDataschema(schema.to_owned()));
    }
    Ok(())
}

pub fn validate_extensions(extensions: &Map<String, Value>) -> Result<(), EventError> {
    if extensions.len() > MAX_EXTENSIONS {
        return Err(EventError::TooManyExtensions(extensions.len()));
    }
    for (name, value) in extensions {
        validate_extension_name(name)?;
        if let ExtensionValue::String(s) = extension_value(name, value)? {
            validate_string("extensions", &s)?;
        }
    }
    Ok(())
}

/// Checks a jsonb `extensions` value that has not been narrowed to an object yet.
pub fn validate_extensions_value(extensions: &Value) -> Result<(), EventError> {
    match extensions {
        Value::Object(map) => validate_extensions(map),
        Value::Null => Err(EventError::ExtensionsNotObject("null")),
        Value::Array(_) => Err(EventError::ExtensionsNotObject("an array")),
        Value::String(_) => Err(EventError::ExtensionsNotObject("a string")),
        Value::Number(_) => Err(EventError::ExtensionsNotObject("a number")),
        Value::Bool(_) => Err(EventError::ExtensionsNotObject("a boolean")),
    }
}

pub fn validate_extension_name(name: &str) -> Result<(), EventError> {
    let well_formed = !name.is_empty()
        && name.len() <= MAX_EXTENSION_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !well_formed {
        return Err(EventError::InvalidExtensionName(name.to_owned()));
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(EventError::ReservedExtensionName(name.to_owned()));
    }
    Ok(())
}

/// An empty key would be no key to the relay's ordering: refuse it, NULL means no key.
pub fn validate_partition_key(key: &str) -> Result<(), EventError> {
    if key.is_empty() {
        return Err(EventError::Empty("partition_key"));
    }
    // Sent as the `partitionkey` extension, a CloudEvents String.
    validate_string("partition_key", key)
}

/// A stream an event names: not empty, and within `prefix` (`broadcaster.stream_prefix`; empty:
/// any), so a producer can't make the relay write to a key outside the ones it is meant to.
pub fn validate_stream(stream: &str, prefix: &str) -> Result<(), EventError> {
    if stream.is_empty() {
        return Err(EventError::Empty("stream"));
    }
    if !stream.starts_with(prefix) {
        return Err(EventError::StreamOutsidePrefix {
            stream: stream.to_owned(),
            prefix: prefix.to_owned(),
        });
    }
    Ok(())
}

pub fn validate_datacontenttype(content_type: &str) -> Result<(), EventError> {
    if content_type.trim().is_empty() {
        return Err(EventError::Empty("datacontenttype"));
    }
    validate_string("datacontenttype", content_type)
}

/// RFC 3986 `URI-reference`: only the characters the grammar allows, `%` followed by two hex
/// digits, and a well-formed scheme when the reference has one.
pub fn is_uri_reference(s: &str) -> bool {
    if s.is_empty() {
        return false;
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = |j: usize| bytes.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return false;
            }
            i += 3;
            continue;
        }
        let allowed = b.is_ascii_alphanumeric() || b"-._~:/?#[]@!$&'()*+,;=".contains(&b);
        if !allowed {
            return false;
        }
        i += 1;
    }
    // A colon before any '/', '?' or '#' ends a scheme, which must be ALPHA *( ALPHA / DIGIT /
    // "+" / "-" / "." ). A relative reference can't have such a colon in its first segment.
    let head_end = s.find(['/', '?', '#']).unwrap_or(s.len());
    if let Some(colon) = s[..head_end].find(':') {
        let scheme = &s[..colon];
        let mut chars = scheme.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
        if !first_ok
            || !chars.all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.')
        {
            return false;
        }
    }
    true
}

/// The default `source`: a URI naming the database, `postgresql:///<database>`, with the name
/// percent-encoded so any database name gives a valid URI.
pub fn default_source_for(database: &str) -> String {
    let mut out = String::from("postgresql:///");
    for b in database.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudevents::AttributesReader;
    use serde_json::json;

    fn sample() -> OutboxEvent {
        OutboxEvent {
            id: "0b5b3d9e-58a4-4c44-9a83-6a4a8fd0c7a1".into(),
            ty: "order.created".into(),
            source: "/shop/orders".into(),
            subject: Some("order-42".into()),
            time: "2026-11-27T07:00:00.123456Z".into(),
            datacontenttype: "application/json".into(),
            dataschema: Some("https://example.com/schemas/order.json".into()),
            data: Some(r#"{"id": 42, "total": "9.99"}"#.into()),
            partition_key: Some("customer-7".into()),
            extensions: json!({"traceparent": "00-abc-01", "tenant": 3, "urgent": true})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            stream: None,
        }
    }

    #[test]
    fn builds_a_cloud_event_with_every_attribute() {
        let event = sample().to_cloud_event().expect("valid event");
        assert_eq!(event.id(), "0b5b3d9e-58a4-4c44-9a83-6a4a8fd0c7a1");
        assert_eq!(event.ty(), "order.created");
        assert_eq!(event.source().as_str(), "/shop/orders");
        assert_eq!(event.subject(), Some("order-42"));
        assert_eq!(event.datacontenttype(), Some("application/json"));
        assert_eq!(
            event.dataschema().map(|u| u.as_str()),
            Some("https://example.com/schemas/order.json")
        );
        assert_eq!(
            event.time().map(|t| t.to_rfc3339()),
            Some("2026-11-27T07:00:00.123456+00:00".to_string())
        );
        assert_eq!(
            event.extension("partitionkey"),
            Some(&ExtensionValue::String("customer-7".into()))
        );
        assert_eq!(event.extension("tenant"), Some(&ExtensionValue::Integer(3)));
        assert_eq!(
            event.extension("urgent"),
            Some(&ExtensionValue::Boolean(true))
        );
        assert_eq!(
            event.data(),
            Some(&Data::Json(json!({"id": 42, "total": "9.99"})))
        );
    }

    #[test]
    fn structured_json_parses_back_as_the_same_event() {
        let event = sample().to_cloud_event().expect("valid event");
        let text = serde_json::to_string(&event).expect("serializes");
        let back: Event = serde_json::from_str(&text).expect("parses with the SDK");
        assert_eq!(back, event);
        let raw: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(raw["specversion"], "1.0");
    }

    #[test]
    fn numbers_keep_every_digit() {
        let text = r#"{"total":99.90,"big":123456789012345678901234567890.5}"#;
        let mut e = sample();
        e.data = Some(text.into());
        let event = e.to_cloud_event().expect("valid event");
        let Some(Data::Json(data)) = event.data() else {
            panic!("json data expected")
        };
        assert_eq!(serde_json::to_string(data).expect("serializes"), text);
    }

    #[test]
    fn text_content_type_carries_the_string_itself() {
        let mut e = sample();
        e.datacontenttype = "text/plain".into();
        e.data = Some(r#""hello""#.into());
        let event = e.to_cloud_event().expect("valid event");
        assert_eq!(event.data(), Some(&Data::String("hello".into())));
        assert_eq!(e.data_bytes(), Ok(Some(b"hello"[..].into())));
        e.datacontenttype = "application/json".into();
        assert_eq!(e.data_bytes(), Ok(Some(br#""hello""#[..].into())));
    }

    #[test]
    fn event_without_data_keeps_its_content_type() {
        let mut e = sample();
        e.data = None;
        let event = e.to_cloud_event().expect("valid event");
        assert_eq!(event.data(), None);
        assert_eq!(event.datacontenttype(), Some("application/json"));
        assert!(event.dataschema().is_some());
        let structured: Event =
            serde_json::from_slice(&e.structured_json().expect("json")).expect("SDK parses it");
        assert_eq!(structured.datacontenttype(), Some("application/json"));
        assert_eq!(structured.data(), None);
    }

    #[test]
    fn structured_json_carries_the_stored_text_unchanged() {
        let mut e = sample();
        e.data = Some(r#"{"a":1,"a":2,  "b" : [1.50, 1e400]}"#.into());
        let json = String::from_utf8(e.structured_json().expect("json")).expect("utf-8");
        assert!(
            json.ends_with(r#","data":{"a":1,"a":2,  "b" : [1.50, 1e400]}}"#),
            "{json}"
        );
        // Still an event the SDK reads, with every attribute.
        let event: Event = serde_json::from_str(&json).expect("SDK parses it");
        assert_eq!(event.id(), e.id);
        assert_eq!(event.datacontenttype(), Some("application/json"));
        // A non-JSON content type: the stored JSON string is the format's string data.
        e.datacontenttype = "text/plain".into();
        e.data = Some(r#""hello\nworld""#.into());
        let event: Event =
            serde_json::from_slice(&e.structured_json().expect("json")).expect("SDK parses it");
        assert_eq!(event.data(), Some(&Data::String("hello\nworld".into())));
    }

    #[test]
    fn the_row_check_refuses_what_a_consumer_could_not_read() {
        let base = EventRow {
            ty: Some("order.created"),
            source: Some("/shop"),
            data: Some(r#"{"a": 1}"#),
            ..Default::default()
        };
        let check = |row: EventRow| row.validate(1000, "app:").map_err(|e| (e.column(), e));
        assert!(check(base).is_ok());
        // A lone UTF-16 surrogate, escaped: PostgreSQL's json takes it, strict parsers don't.
        let lone = check(EventRow {
            data: Some(r#"{"s":"\ud83d"}"#),
            ..base
        })
        .expect_err("lone surrogate");
        assert_eq!(lone.0, "data");
        assert!(check(EventRow {
            data: Some(r#"{"s":"\ud83d\ude00"}"#),
            ..base
        })
        .is_ok());
        // Nesting past serde_json's 128 levels, which the relay could not parse back.
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(
            check(EventRow {
                data: Some(&deep),
                ..base
            })
            .expect_err("deep")
            .0,
            "data"
        );
        let fine = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        assert!(check(EventRow {
            data: Some(&fine),
            ..base
        })
        .is_ok());
        // Control characters and noncharacters in String attributes.
        assert_eq!(
            check(EventRow {
                ty: Some("a\tb"),
                ..base
            })
            .expect_err("tab")
            .0,
            "type"
        );
        assert_eq!(
            check(EventRow {
                subject: Some("a\nb"),
                ..base
            })
            .expect_err("newline")
            .0,
            "subject"
        );
        assert_eq!(
            check(EventRow {
                partition_key: Some("k\u{85}"),
                ..base
            })
            .expect_err("NEL")
            .0,
            "partition_key"
        );
        assert_eq!(
            check(EventRow {
                datacontenttype: Some("text/\u{fffe}"),
                ..base
            })
            .expect_err("nonchar")
            .0,
            "datacontenttype"
        );
        assert!(check(EventRow {
            subject: Some("Zürich 🌀"),
            ..base
        })
        .is_ok());
        // CloudEvents' Integer is 32-bit.
        let big = serde_json::json!({"n": 2_147_483_648_i64});
        assert_eq!(
            check(EventRow {
                extensions: Some(&big),
                ..base
            })
            .expect_err("2^31")
            .0,
            "extensions"
        );
        let max = serde_json::json!({"n": 2_147_483_647, "m": -2_147_483_648_i64});
        assert!(check(EventRow {
            extensions: Some(&max),
            ..base
        })
        .is_ok());
        let ctl = serde_json::json!({"s": "a\u{1b}[31m"});
        assert_eq!(
            check(EventRow {
                extensions: Some(&ctl),
                ..base
            })
            .expect_err("escape")
            .0,
            "extensions"
        );
        // Over broadcaster.max_event_size, counted as the relay counts it.
        let blob = format!("\"{}\"", "x".repeat(1000));
        let (column, e) = check(EventRow {
            data: Some(&blob),
            ..base
        })
        .expect_err("too large");
        assert_eq!(column, "data");
        assert!(matches!(e, EventError::TooLarge { max: 1000, .. }), "{e}");
        // Streams within broadcaster.stream_prefix only.
        assert!(check(EventRow {
            stream: Some("app:orders"),
            ..base
        })
        .is_ok());
        let (column, e) = check(EventRow {
            stream: Some("billing:x"),
            ..base
        })
        .expect_err("outside");
        assert_eq!(column, "stream");
        assert!(matches!(e, EventError::StreamOutsidePrefix { .. }), "{e}");
    }

    #[test]
    fn refuses_bad_attributes() {
        let mut e = sample();
        e.ty = String::new();
        assert_eq!(e.to_cloud_event(), Err(EventError::Empty("type")));

        let mut e = sample();
        e.source = "not a uri".into();
        assert!(matches!(
            e.to_cloud_event(),
            Err(EventError::InvalidSource(_))
        ));

        let mut e = sample();
        e.dataschema = Some("/relative/schema".into());
        assert!(matches!(
            e.to_cloud_event(),
            Err(EventError::InvalidDataschema(_))
        ));

        let mut e = sample();
        e.time = "yesterday".into();
        assert!(matches!(
            e.to_cloud_event(),
            Err(EventError::InvalidTime(_))
        ));
    }

    #[test]
    fn uri_references() {
        for ok in [
            "/orders",
            "https://example.com/a?b=c#d",
            "urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66",
            "orders",
            "postgresql:///shop",
            "a%20b",
            "mailto:ops@example.com",
        ] {
            assert!(is_uri_reference(ok), "{ok} should be accepted");
        }
        for bad in ["", "a b", "%zz", "1http://x", "é", "a\nb", "<tag>", "x%2"] {
            assert!(!is_uri_reference(bad), "{bad:?} should be refused");
        }
    }

    #[test]
    fn extension_names_follow_the_cloudevents_rule() {
        assert!(validate_extension_name("traceparent").is_ok());
        assert!(validate_extension_name("abc123").is_ok());
        for bad in [
            "",
            "Upper",
            "with-dash",
            "with_underscore",
            "abcdefghijklmnopqrstu",
        ] {
            assert!(
                matches!(
                    validate_extension_name(bad),
                    Err(EventError::InvalidExtensionName(_))
                ),
                "{bad:?}"
            );
        }
        for reserved in ["id", "source", "type", "time", "data", "partitionkey"] {
            assert!(matches!(
                validate_extension_name(reserved),
                Err(EventError::ReservedExtensionName(_))
            ));
        }
    }

    #[test]
    fn extension_values_are_strings_integers_or_booleans() {
        assert!(validate_extensions_value(&json!({"a": "x", "b": 1, "c": false})).is_ok());
        assert!(matches!(
            validate_extensions_value(&json!({"a": 1.5})),
            Err(EventError::InvalidExtensionValue(_))
        ));
        assert!(matches!(
            validate_extensions_value(&json!({"a": {"nested": 1}})),
            Err(EventError::InvalidExtensionValue(_))
        ));
        assert!(matches!(
            validate_extensions_value(&json!([1])),
            Err(EventError::ExtensionsNotObject(_))
        ));
    }

    #[test]
    fn json_content_types() {
        assert!(is_json_content_type("application/json"));
        assert!(is_json_content_type("application/json; charset=utf-8"));
        assert!(is_json_content_type("application/vnd.order+json"));
        assert!(!is_json_content_type("text/plain"));
    }

    #[test]
    fn default_source_names_the_database() {
        assert_eq!(default_source_for("shop"), "postgresql:///shop");
        let odd = default_source_for("my db/ü");
        assert_eq!(odd, "postgresql:///my%20db%2F%C3%BC");
        assert!(is_uri_reference(&odd));
    }
}
