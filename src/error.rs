//! The extension's one error type: everything a SQL caller can be refused, each with a
//! deliberate SQLSTATE (the PostgreSQL error code a client matches on), a message that says
//! what is wrong, and a hint that says what to do.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use crate::backend::ConfigError;
use crate::event::EventError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An outbox row that does not make a valid CloudEvent: 22023 (54000 too large, 42501 a
    /// stream outside `broadcaster.stream_prefix`).
    #[error("broadcaster: invalid event: {0}")]
    InvalidEvent(#[from] EventError),
    /// A `time` RFC 3339 can't carry (infinite, or outside years 1 to 9999): 23514.
    #[error("broadcaster: invalid event: time {0} is not an RFC 3339 time: it must be finite, in years 1 to 9999")]
    InvalidTime(String),
    /// `backend` names no server of the `broadcaster` wrapper: 42704.
    #[error("broadcaster: no backend named \"{0}\"")]
    UnknownBackend(String),
    /// The writing role has no `USAGE` on the server it names: 42501.
    #[error("broadcaster: permission denied for backend \"{0}\"")]
    BackendNotPermitted(String),
    /// A server without the `backend` option: 22023.
    #[error("broadcaster: a server needs the option \"backend\"")]
    MissingKind { known: String },
    /// A server's or user mapping's options: HV00D an unknown name, 22023 a bad value or
    /// kind, 42501 a kind only a superuser may create.
    #[error("broadcaster: {0}")]
    Options(#[from] ConfigError),
    /// `DROP EXTENSION` while the outbox holds undelivered events: 55006.
    #[error("broadcaster: {0} events in broadcaster_outbox are not delivered yet; dropping the extension would lose them")]
    Undelivered(i64),
}

impl Error {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            Error::InvalidEvent(EventError::TooLarge { .. }) => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            Error::InvalidEvent(EventError::StreamOutsidePrefix { .. }) => {
                ERRCODE_INSUFFICIENT_PRIVILEGE
            }
            Error::InvalidEvent(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            Error::InvalidTime(_) => ERRCODE_CHECK_VIOLATION,
            Error::UnknownBackend(_) => ERRCODE_UNDEFINED_OBJECT,
            Error::BackendNotPermitted(_) => ERRCODE_INSUFFICIENT_PRIVILEGE,
            Error::MissingKind { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            Error::Options(ConfigError::UnknownOption { .. }) => ERRCODE_FDW_INVALID_OPTION_NAME,
            Error::Options(ConfigError::SuperuserOnly { .. })
            | Error::Options(ConfigError::SuperuserOption { .. }) => ERRCODE_INSUFFICIENT_PRIVILEGE,
            Error::Options(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            Error::Undelivered(_) => ERRCODE_OBJECT_IN_USE,
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            Error::InvalidEvent(e) => Some(format!("The value of \"{}\" is refused.", e.column())),
            Error::InvalidTime(_) => Some("The value of \"time\" is refused.".into()),
            Error::UnknownBackend(_) | Error::BackendNotPermitted(_) => {
                Some("The value of \"backend\" is refused.".into())
            }
            _ => None,
        }
    }

    fn hint(&self) -> String {
        match self {
            Error::InvalidEvent(_) | Error::InvalidTime(_) => {
                "See the broadcaster_outbox column rules in the README.".into()
            }
            Error::UnknownBackend(name) => format!(
                "Leave backend NULL for the default backend, or CREATE SERVER {name} FOREIGN DATA WRAPPER broadcaster OPTIONS (backend 'redis', ...)."
            ),
            Error::BackendNotPermitted(name) => format!(
                "A superuser or the server's owner can GRANT USAGE ON FOREIGN SERVER {name} TO the writing role."
            ),
            Error::MissingKind { known } => {
                format!("Add OPTIONS (backend 'redis', ...); backends: {known}.")
            }
            Error::Options(_) => {
                "See \"Named backends\" in the README for each backend's options.".into()
            }
            Error::Undelivered(_) => "Let the relay deliver them (broadcaster_status shows what is pending), or discard them first with DELETE FROM broadcaster_outbox.".into(),
        }
    }

    /// Raises this error (ERROR: the statement and its transaction fail).
    pub fn raise(self, function: &'static str) -> ! {
        let mut report = ErrorReport::new(self.sqlstate(), self.to_string(), function);
        if let Some(detail) = self.detail() {
            report = report.set_detail(detail);
        }
        report.set_hint(self.hint()).report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}
