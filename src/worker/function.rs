//! The `function` backend: a SQL-callable function receives each batch, so that a backend can
//! be written in PL/pgSQL, PL/Python or any language without recompiling the extension.
//!
//! `CREATE SERVER sink FOREIGN DATA WRAPPER broadcaster OPTIONS (backend 'function',
//! function 'public.my_sink(jsonb)')`. The function takes one `jsonb` argument, a JSON array of
//! the batch's events in CloudEvents structured form (`application/cloudevents+json`), and
//! returns `text[]`: NULL when every event was delivered, or one element per event, NULL for
//! delivered and the reason for a rejected one (counted as a failed attempt). An ERROR it
//! raises fails the batch as an outage: nothing is counted, and the batch is retried after the
//! relay's backoff. It runs in the relay's transaction, in a subtransaction of its own, with
//! the relay's rights (a superuser's): only a superuser may create such a server.

use pgrx::prelude::*;

use crate::backend::{BatchError, ConfigError, Options, Outcome, PublisherBackend};
use crate::event::OutboxEvent;
use crate::pg;

/// The kind's name, as a server's `backend` option gives it.
pub const KIND: &str = "function";

/// The options a `function` server takes: `function`, and `statement_timeout` (milliseconds,
/// default [`DEFAULT_TIMEOUT_MS`]; 0 for none), the bound on each call.
pub const OPTIONS: &[&str] = &["function", "statement_timeout"];

/// How long one call may run unless the server says otherwise: a call holds the relay's
/// transaction open, its rows locked.
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;

/// The function `function` names (a schema-qualified signature such as `public.my_sink(jsonb)`),
/// checked: it exists, takes one jsonb, returns text[] and belongs to a superuser. Returns how the relay calls it: the function's
/// name as PostgreSQL prints it (`regproc`), schema-qualified under the relay's search path,
/// which holds pg_catalog only. Inside a transaction.
pub fn resolve(function: &str) -> Result<String, ConfigError> {
    let invalid = |why: String| ConfigError::InvalidValue {
        name: "function".into(),
        why,
    };
    if !function
        .split('(')
        .next()
        .is_some_and(|name| name.contains('.'))
    {
        return Err(invalid(format!(
            "{function:?} names no schema; give the function's schema, such as public.my_sink(jsonb): the relay runs with search_path = pg_catalog, pg_temp"
        )));
    }
    let found = Spi::get_three_with_args::<String, bool, bool>(
        "SELECT (p.oid::pg_catalog.regproc)::text,
                p.pronargs = 1 AND p.proargtypes[0] = 'pg_catalog.jsonb'::pg_catalog.regtype
                AND p.prorettype = 'pg_catalog.text[]'::pg_catalog.regtype AND NOT p.proretset,
                r.rolsuper
           FROM pg_catalog.pg_proc p
           JOIN pg_catalog.pg_roles r ON r.oid = p.proowner
          WHERE p.oid = pg_catalog.to_regprocedure($1)",
        &[function.into()],
    );
    match found {
        Ok((Some(_), Some(true), Some(false))) => Err(invalid(format!(
            "{function:?} must belong to a superuser: the relay runs it with a superuser's rights, and its owner could change it"
        ))),
        Ok((Some(name), Some(true), Some(true))) => Ok(name),
        Ok((Some(_), _, _)) => Err(invalid(format!(
            "{function:?} must take one jsonb argument and return text[]"
        ))),
        Ok((None, _, _)) => Err(invalid(format!(
            "no function {function:?}; give its signature, such as public.my_sink(jsonb)"
        ))),
        Err(e) => Err(invalid(format!("{function:?}: {e}"))),
    }
}

pub struct FunctionBackend {
    /// The signature the server names, for its health check.
    function: String,
    /// `statement_timeout` of each call, in milliseconds.
    timeout_ms: u64,
    /// `SELECT <function>($1::jsonb)`.
    call: String,
}

impl FunctionBackend {
    /// The backend for a server's options. Inside a transaction.
    pub fn new(options: &Options) -> Result<Self, BatchError> {
        options.only(OPTIONS)?;
        let function = options.text("function", "");
        let name = resolve(&function)?;
        let timeout_ms = options.parse("statement_timeout", DEFAULT_TIMEOUT_MS)?;
        Ok(FunctionBackend {
            function,
            timeout_ms,
            call: format!("SELECT {name}($1::pg_catalog.jsonb)"),
        })
    }
}

impl PublisherBackend for FunctionBackend {
    fn name(&self) -> &'static str {
        KIND
    }

    fn publish(&mut self, events: &[OutboxEvent]) -> Result<Vec<Outcome>, BatchError> {
        let mut outcome = Vec::with_capacity(events.len());
        let mut batch = String::from("[");
        let mut sent = Vec::with_capacity(events.len());
        for (i, event) in events.iter().enumerate() {
            match event
                .structured_json()
                .map_err(|e| e.to_string())
                .and_then(|json| String::from_utf8(json).map_err(|e| e.to_string()))
            {
                Ok(json) => {
                    if !sent.is_empty() {
                        batch.push(',');
                    }
                    batch.push_str(&json);
                    sent.push(i);
                    outcome.push(Outcome::Delivered);
                }
                Err(e) => outcome.push(Outcome::invalid(e)),
            }
        }
        batch.push(']');
        if sent.is_empty() {
            return Ok(outcome);
        }
        let (call, function, timeout) = (&self.call, &self.function, self.timeout_ms);
        let expected = sent.len();
        // Its answer is checked inside the subtransaction: what the function wrote is kept only
        // with an answer the relay can act on.
        let answers = pg::in_subtransaction(|| {
            Spi::run_with_args(
                "SELECT pg_catalog.set_config('statement_timeout', $1, true)",
                &[timeout.to_string().into()],
            )
            .map_err(|e| e.to_string())?;
            let answers =
                Spi::get_one_with_args::<Vec<Option<String>>>(call, &[batch.as_str().into()])
                    .map_err(|e| format!("{function}: {e}"))?;
            match answers {
                Some(a) if a.len() != expected => Err(format!(
                    "{function} returned {} outcomes for {expected} events",
                    a.len()
                )),
                other => Ok(other),
            }
        })
        .map_err(|message| BatchError::Unavailable(format!("{function}: {message}")))?;
        let Some(answers) = answers else {
            return Ok(outcome);
        };
        for (i, answer) in sent.into_iter().zip(answers) {
            if let Some(reason) = answer {
                outcome[i] = Outcome::Rejected(reason);
            }
        }
        Ok(outcome)
    }

    /// The function is still there, as the server names it. Inside a transaction.
    fn health_check(&mut self) -> Result<(), BatchError> {
        resolve(&self.function).map(drop).map_err(BatchError::from)
    }
}
