//! File backend: appends each event as one line of `application/cloudevents+json`. A second,
//! tiny backend that proves the trait is the whole contract; handy for tests and for piping
//! events into tools that read JSON lines.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};

use super::{each_in_key_order, BackendConfig, BackendError, BatchOutcome, PublisherBackend};
use crate::event::OutboxEvent;

pub struct FileBackend {
    path: String,
}

impl FileBackend {
    pub fn from_config(config: &BackendConfig) -> Result<Box<dyn PublisherBackend>, BackendError> {
        if config.file_path.is_empty() {
            return Err(BackendError::Config(
                "the file backend needs broadcaster.file_path".into(),
            ));
        }
        Ok(Box::new(FileBackend {
            path: config.file_path.clone(),
        }))
    }

    fn open(&self) -> Result<File, BackendError> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| BackendError::Unavailable(format!("cannot open {}: {e}", self.path)))
    }

    fn line(event: &OutboxEvent) -> Result<Vec<u8>, BackendError> {
        let mut line = serde_json::to_vec(&event.to_cloud_event()?)
            .map_err(|e| BackendError::Rejected(e.to_string()))?;
        line.push(b'\n');
        Ok(line)
    }
}

impl PublisherBackend for FileBackend {
    fn name(&self) -> &'static str {
        "file"
    }

    fn publish(&mut self, event: &OutboxEvent) -> Result<(), BackendError> {
        self.publish_batch(std::slice::from_ref(event))?
            .pop()
            .unwrap_or(Ok(()))
    }

    fn publish_batch(&mut self, events: &[OutboxEvent]) -> Result<BatchOutcome, BackendError> {
        let io_error = |e: std::io::Error| BackendError::Unavailable(format!("{}: {e}", self.path));
        let mut out = BufWriter::new(self.open()?);
        let outcome = each_in_key_order(events, |event| {
            let line = Self::line(event)?;
            out.write_all(&line).map_err(io_error)
        })?;
        // Durable before the worker deletes the rows.
        let file = out.into_inner().map_err(|e| io_error(e.into_error()))?;
        file.sync_data().map_err(io_error)?;
        Ok(outcome)
    }

    fn health_check(&mut self) -> Result<(), BackendError> {
        self.open().map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_one_cloudevents_json_line_per_event() {
        let path =
            std::env::temp_dir().join(format!("broadcaster-file-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let config = BackendConfig {
            file_path: path.to_string_lossy().into_owned(),
            ..Default::default()
        };
        let mut backend = FileBackend::from_config(&config).expect("configured");
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
            .publish_batch(&[event("a"), bad, event("b")])
            .expect("file is writable");
        assert!(outcome[0].is_ok() && outcome[1].is_err() && outcome[2].is_ok());
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
        assert!(matches!(
            FileBackend::from_config(&BackendConfig::default()),
            Err(BackendError::Config(_))
        ));
    }
}
