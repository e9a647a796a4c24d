//! File backend: appends each event as one line of `application/cloudevents+json`. A second,
//! tiny backend that shows the contract is the whole of a backend; handy for tests and for
//! piping events into tools that read JSON lines. Only a superuser may create a `file` server:
//! the relay writes the file with the server's operating-system rights.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};

use super::{Backend, BatchError, Config, ConfigError, Options, Outcome, PublisherBackend};
use crate::event::OutboxEvent;

/// `CREATE SERVER ... OPTIONS (backend 'file', path '/var/lib/events.jsonl')`.
pub struct FileConfig {
    /// The file appended to (`path`; the default backend's is `broadcaster.file_path`).
    pub path: String,
}

impl Config for FileConfig {
    const OPTIONS: &'static [&'static str] = &["path"];
    const SUPERUSER_ONLY: bool = true;

    fn from_options(options: &Options) -> Result<Self, ConfigError> {
        let path = options.text("path", "");
        if path.is_empty() {
            return Err(ConfigError::InvalidValue {
                name: "path".into(),
                why: "the file backend needs a file to append to".into(),
            });
        }
        Ok(FileConfig { path })
    }
}

pub struct FileBackend {
    path: String,
}

impl Backend for FileBackend {
    type Config = FileConfig;

    fn new(config: FileConfig) -> Result<Self, BatchError> {
        Ok(FileBackend { path: config.path })
    }
}

impl FileBackend {
    fn unavailable(&self, e: std::io::Error) -> BatchError {
        BatchError::Unavailable(format!("{}: {e}", self.path))
    }
}

impl PublisherBackend for FileBackend {
    fn name(&self) -> &'static str {
        "file"
    }

    fn publish(&mut self, events: &[OutboxEvent]) -> Result<Vec<Outcome>, BatchError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| self.unavailable(e))?;
        let mut out = BufWriter::new(file);
        let mut outcomes = Vec::with_capacity(events.len());
        for event in events {
            let line = event
                .to_cloud_event()
                .map_err(Outcome::invalid)
                .and_then(|e| serde_json::to_vec(&e).map_err(Outcome::invalid));
            match line {
                Ok(mut line) => {
                    line.push(b'\n');
                    out.write_all(&line).map_err(|e| self.unavailable(e))?;
                    outcomes.push(Outcome::Delivered);
                }
                Err(rejected) => outcomes.push(rejected),
            }
        }
        // Durable before the relay deletes the rows.
        let file = out
            .into_inner()
            .map_err(|e| BatchError::Unavailable(format!("{}: {}", self.path, e.error())))?;
        file.sync_data().map_err(|e| self.unavailable(e))?;
        Ok(outcomes)
    }

    fn health_check(&mut self) -> Result<(), BatchError> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map(drop)
            .map_err(|e| self.unavailable(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Kind;

    #[test]
    fn appends_one_cloudevents_json_line_per_event() {
        let path =
            std::env::temp_dir().join(format!("broadcaster-file-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let options = Options::new([("path", path.to_string_lossy().into_owned())]);
        let mut backend = Kind::find("file")
            .map(|k| k.build(&options))
            .expect("known")
            .expect("configured");
        let event = |id: &str| OutboxEvent {
            id: id.into(),
            ty: "t".into(),
            source: "/s".into(),
            time: "2026-01-01T00:00:00Z".into(),
            datacontenttype: "application/json".into(),
            data: Some(format!(r#"{{"k": "{id}"}}"#)),
            ..Default::default()
        };
        let bad = OutboxEvent {
            ty: String::new(),
            ..event("bad")
        };
        let outcome = backend
            .publish(&[event("a"), bad, event("b")])
            .expect("file is writable");
        assert_eq!(outcome[0], Outcome::Delivered);
        assert!(matches!(outcome[1], Outcome::Rejected(_)));
        assert_eq!(outcome[2], Outcome::Delivered);
        backend.health_check().expect("healthy");

        let text = std::fs::read_to_string(&path).expect("written");
        let ids: Vec<String> = text
            .lines()
            .map(|l| {
                let e: cloudevents::Event = serde_json::from_str(l).expect("SDK parses the line");
                cloudevents::AttributesReader::id(&e).to_string()
            })
            .collect();
        assert_eq!(ids, ["a", "b"]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn needs_a_path() {
        let kind = Kind::find("file").expect("known");
        assert!(matches!(
            kind.validate(&Options::default()),
            Err(ConfigError::InvalidValue { .. })
        ));
        assert!(kind.superuser_only);
    }
}
