//! Redis Sentinel: the relay asks the sentinels where the primary is each time it connects, so
//! that after a failover (or a `READONLY` reply from a demoted primary, which drops the
//! connection) it finds the new primary by itself. As the Sentinel client guidelines say: each
//! sentinel in turn is asked `SENTINEL get-master-addr-by-name`, and the address it gives must
//! answer `ROLE` with `master`. Every step is bounded by the network timeout (redis-rs's own
//! `SentinelClient` connects without one, and a hung sentinel would hold the relay forever).
//!
//! URL: `redis+sentinel://[user:password@]host:port[,host:port...]/<master name>[/<db>]`, or
//! `rediss+sentinel://...` for TLS to the sentinels and the primary alike (as Lettuce's
//! `rediss-sentinel://` and go-redis's failover client do). The credentials are the primary's;
//! a sentinel is asked without them unless it requires them (`NOAUTH`: a sentinel with
//! `requirepass`, which then must be the same).

use std::time::Duration;

use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};
use redis::{Client, ConnectionInfo, IntoConnectionInfo, TlsCertificates};

/// A parsed `redis+sentinel://` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    /// The sentinels' addresses, in the order given.
    pub sentinels: Vec<(String, u16)>,
    /// The name the sentinels monitor the primary under (`sentinel monitor <name> ...`).
    pub master: String,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<String>,
    /// `rediss+sentinel://`: TLS to the sentinels and the primary.
    pub tls: bool,
}

impl std::fmt::Debug for SentinelUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelUrl")
            .field("sentinels", &self.sentinels)
            .field("master", &self.master)
            .field("db", &self.db)
            .finish_non_exhaustive()
    }
}

/// The expected form, for errors.
pub const FORM: &str =
    "redis+sentinel://[user:password@]host:port[,host:port...]/<master name>[/<db>]";

impl SentinelUrl {
    /// None when `url` is not a sentinel URL; Err says what is wrong (never with the password).
    pub fn parse(url: &str) -> Option<Result<SentinelUrl, String>> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            (false, rest)
        } else {
            (true, url.strip_prefix("rediss+sentinel://")?)
        };
        Some(Self::parse_rest(tls, rest))
    }

    fn parse_rest(tls: bool, rest: &str) -> Result<SentinelUrl, String> {
        // The credentials end at the last `@` (a password may hold `/`); the hosts, at the
        // next `/`.
        let (credentials, rest) = match rest.rsplit_once('@') {
            Some((credentials, rest)) => (Some(credentials), rest),
            None => (None, rest),
        };
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        let decode = |s: &str| -> Result<String, String> {
            percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| "the credentials are not UTF-8 once percent-decoded".to_string())
        };
        let (username, password) = match credentials {
            None => (None, None),
            Some(c) => {
                let (user, password) = c.split_once(':').unwrap_or((c, ""));
                let user = Some(decode(user)?).filter(|u| !u.is_empty());
                let password = Some(decode(password)?).filter(|p| !p.is_empty());
                (user, password)
            }
        };
        let mut sentinels = Vec::new();
        for host in hosts.split(',').filter(|h| !h.is_empty()) {
            let (name, port) = host
                .rsplit_once(':')
                .ok_or_else(|| format!("sentinel {host:?} has no port; expected {FORM}"))?;
            let port = port
                .parse::<u16>()
                .map_err(|_| format!("sentinel {host:?}: bad port; expected {FORM}"))?;
            let name = name.trim_start_matches('[').trim_end_matches(']');
            sentinels.push((name.to_string(), port));
        }
        if sentinels.is_empty() {
            return Err(format!("no sentinel address; expected {FORM}"));
        }
        let mut segments = path.split('/').filter(|s| !s.is_empty());
        let master = segments
            .next()
            .map(decode)
            .transpose()?
            .ok_or_else(|| format!("no master name; expected {FORM}"))?;
        let db = match segments.next() {
            Some(db) => db
                .parse::<i64>()
                .map_err(|_| format!("database {db:?} is not a number; expected {FORM}"))?,
            None => 0,
        };
        Ok(SentinelUrl {
            sentinels,
            master,
            db,
            username,
            password,
            tls,
        })
    }

    /// Asks the sentinels where the primary is, and checks it says it is one: how to connect
    /// to it (with this URL's credentials). With `rediss+sentinel://`, the sentinels and the
    /// primary are reached over TLS, checked against `certificates` (the `tls_*_file` options)
    /// or the system's CAs. A sentinel is asked without credentials, and again with this URL's
    /// when it requires them (`NOAUTH`). Each connection and reply is bounded by `timeout`.
    /// Err says what each sentinel answered (never the password).
    pub fn primary(
        &self,
        timeout: Duration,
        certificates: Option<&TlsCertificates>,
    ) -> Result<ConnectionInfo, String> {
        let mut why = Vec::new();
        for (host, port) in &self.sentinels {
            let ask = |credentials: bool| {
                connection_info(&self.address(host, *port, credentials, None), certificates)
                    .and_then(|info| super::cluster::connect(info, timeout))
                    .and_then(|mut c| {
                        redis::cmd("SENTINEL")
                            .arg("get-master-addr-by-name")
                            .arg(&self.master)
                            .query::<Option<(String, u16)>>(&mut c)
                    })
            };
            let asked = match ask(false) {
                Err(e) if requires_credentials(&e) && self.has_credentials() => ask(true),
                asked => asked,
            };
            let (primary_host, primary_port) = match asked {
                Ok(Some(address)) => address,
                Ok(None) => {
                    why.push(format!("{host}:{port}: no master named {:?}", self.master));
                    continue;
                }
                Err(e) => {
                    why.push(format!("{host}:{port}: {e}"));
                    continue;
                }
            };
            let address = self.address(&primary_host, primary_port, true, Some(self.db));
            let info = connection_info(&address, certificates).map_err(|e| {
                format!(
                    "the primary's address {primary_host}:{primary_port} ({:?})",
                    e.kind()
                )
            })?;
            let role = super::cluster::connect(info.clone(), timeout)
                .and_then(|mut c| redis::cmd("ROLE").query::<Vec<redis::Value>>(&mut c));
            match role.as_ref().map(|r| {
                r.first()
                    .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
            }) {
                Ok(Some(role)) if role == "master" => return Ok(info),
                Ok(role) => why.push(format!(
                    "{host}:{port} named {primary_host}:{primary_port}, which says it is {}",
                    role.unwrap_or_else(|| "nothing".into())
                )),
                Err(e) => why.push(format!(
                    "{host}:{port} named {primary_host}:{primary_port}: {e}"
                )),
            }
        }
        Err(format!("no primary from the sentinels: {}", why.join("; ")))
    }

    /// Checks that `certificates` make a TLS client (readable PEM, a key that goes with the
    /// certificate), as each connect will: Err says what is wrong, before any connect.
    pub fn check_certificates(&self, certificates: Option<&TlsCertificates>) -> Result<(), String> {
        let Some((host, port)) = self.sentinels.first() else {
            return Ok(());
        };
        if !self.tls {
            return Ok(());
        }
        connection_info(&self.address(host, *port, false, None), certificates)
            .map(drop)
            .map_err(|e| format!("the TLS certificates: {e}"))
    }

    fn has_credentials(&self) -> bool {
        self.username.is_some() || self.password.is_some()
    }

    /// The URL of `host:port` in this URL's scheme (`redis` or `rediss`), with its credentials
    /// when `credentials`, and `db` when given.
    fn address(&self, host: &str, port: u16, credentials: bool, db: Option<i64>) -> String {
        let encode = |s: &str| utf8_percent_encode(s, NON_ALPHANUMERIC).to_string();
        let credentials = match (&self.username, &self.password) {
            (None, None) => String::new(),
            _ if !credentials => String::new(),
            (user, password) => format!(
                "{}:{}@",
                encode(user.as_deref().unwrap_or("")),
                encode(password.as_deref().unwrap_or(""))
            ),
        };
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let scheme = if self.tls { "rediss" } else { "redis" };
        let db = db.map(|db| format!("/{db}")).unwrap_or_default();
        format!("{scheme}://{credentials}{host}:{port}{db}")
    }
}

/// How to connect to `url`: with `certificates` (a CA, a client certificate) for TLS when
/// given, else as the URL says.
pub(super) fn connection_info(
    url: &str,
    certificates: Option<&TlsCertificates>,
) -> redis::RedisResult<ConnectionInfo> {
    match certificates {
        None => url.into_connection_info(),
        Some(certificates) => Client::build_with_tls(url, certificates.clone())
            .map(|c| c.get_connection_info().clone()),
    }
}

/// Whether `e` says the server wants credentials first.
fn requires_credentials(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || e.code().is_some_and(|code| code == "NOAUTH")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_parse_or_say_why_without_the_password() {
        let url =
            SentinelUrl::parse("redis+sentinel://relay:p%40ss@10.0.0.1:26379,[::1]:26380/orders/2")
                .expect("a sentinel URL")
                .expect("valid");
        assert_eq!(
            url.sentinels,
            vec![("10.0.0.1".to_string(), 26379), ("::1".to_string(), 26380)]
        );
        assert_eq!((url.master.as_str(), url.db), ("orders", 2));
        assert_eq!(url.username.as_deref(), Some("relay"));
        assert_eq!(url.password.as_deref(), Some("p@ss"));
        assert!(!url.tls);
        assert!(!format!("{url:?}").contains("p@ss"));
        assert!(SentinelUrl::parse("redis://h:1").is_none());
        let tls = SentinelUrl::parse("rediss+sentinel://h:1/m")
            .expect("sentinel")
            .expect("valid");
        assert!(tls.tls && tls.password.is_none());
        for bad in [
            "redis+sentinel:///m",
            "redis+sentinel://h/m",
            "redis+sentinel://h:x/m",
            "redis+sentinel://h:1",
            "redis+sentinel://u:secret@h:1/m/x",
            "redis+sentinel://u:se/cret@h:x/m",
        ] {
            let why = SentinelUrl::parse(bad).expect("sentinel").expect_err(bad);
            assert!(!why.contains("secret"), "{why}");
        }
    }
}
