//! End-to-end harness: a throwaway PostgreSQL cluster with broadcaster preloaded (the library
//! `cargo pgrx install` put in the system's pkglibdir) and its own redis-server, each on a free
//! loopback port, torn down on drop. Run as root, the cluster runs as `BROADCASTER_TEST_RUNAS`
//! (default `postgres`): PostgreSQL refuses to run as root.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use postgres::Client as PgClient;
use redis::streams::StreamRangeReply;

/// How long any wait in a test may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(60);

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Polls `probe` until it returns Some, or panics with `what` after `deadline`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct Redis {
    pub port: u16,
    /// Where a persistent server keeps its append-only file.
    dir: Option<PathBuf>,
    /// More redis-server arguments (TLS).
    extra: Vec<String>,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_on(free_port())
    }

    /// A server that keeps nothing on disk: a restart empties it.
    pub fn start_on(port: u16) -> Redis {
        Self::spawn(port, None, Vec::new())
    }

    /// A server that also listens with TLS on `tls_port`, with `cert`/`key` signed by `ca`;
    /// the plain port stays open for the test's own reads.
    pub fn start_tls(tls_port: u16, cert: &str, key: &str, ca: &str) -> Redis {
        Self::start_tls_with(tls_port, cert, key, ca, false)
    }

    /// The same, and on the TLS port only clients whose certificate `ca` signed get in (mutual
    /// TLS, `--tls-auth-clients yes`).
    pub fn start_mutual_tls(tls_port: u16, cert: &str, key: &str, ca: &str) -> Redis {
        Self::start_tls_with(tls_port, cert, key, ca, true)
    }

    fn start_tls_with(tls_port: u16, cert: &str, key: &str, ca: &str, mutual: bool) -> Redis {
        let extra = [
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            cert,
            "--tls-key-file",
            key,
            "--tls-ca-cert-file",
            ca,
            "--tls-auth-clients",
            if mutual { "yes" } else { "no" },
        ]
        .map(String::from)
        .to_vec();
        Self::spawn(free_port(), None, extra)
    }

    /// A server that fsyncs every write to an append-only file in `dir` before answering, so
    /// what it acknowledged survives a SIGKILL and a restart with the same `dir`.
    pub fn start_persistent(port: u16, dir: &std::path::Path) -> Redis {
        std::fs::create_dir_all(dir).expect("redis dir");
        Self::spawn(port, Some(dir.to_path_buf()), Vec::new())
    }

    /// Restarts a killed server on the same port (and, if persistent, the same data).
    pub fn restart(&mut self) {
        self.kill();
        *self = Self::spawn(self.port, self.dir.clone(), self.extra.clone());
    }

    fn spawn(port: u16, dir: Option<PathBuf>, extra: Vec<String>) -> Redis {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--protected-mode", "no"])
            .args(&extra);
        match &dir {
            Some(d) => cmd
                .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
                .arg(d),
            None => cmd.args(["--appendonly", "no"]),
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/setup.sh)");
        let redis = Redis {
            port,
            dir,
            extra,
            child: Some(child),
        };
        wait_for("redis-server to answer PING", DEADLINE, || {
            let mut c = redis.try_connection()?;
            redis::cmd("PING").query::<String>(&mut c).ok()
        });
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn try_connection(&self) -> Option<redis::Connection> {
        redis::Client::open(self.url())
            .ok()?
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok()
    }

    pub fn connection(&self) -> redis::Connection {
        wait_for("a Redis connection", DEADLINE, || self.try_connection())
    }

    /// Kills the server (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Every entry of `stream`, oldest first.
    pub fn entries(&self, stream: &str) -> Vec<Entry> {
        let mut c = self.connection();
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query(&mut c)
            .expect("XRANGE");
        reply
            .ids
            .into_iter()
            .map(|e| Entry {
                fields: e
                    .map
                    .iter()
                    .filter_map(|(k, v)| {
                        redis::from_redis_value_ref::<String>(v)
                            .ok()
                            .map(|v| (k.clone(), v))
                    })
                    .collect(),
                id: e.id,
            })
            .collect()
    }

    pub fn len(&self, stream: &str) -> usize {
        let mut c = self.connection();
        redis::cmd("XLEN").arg(stream).query(&mut c).unwrap_or(0)
    }

    /// Stops every client's writes (`CLIENT PAUSE 600000 WRITE`): the relay's XADDs wait, its
    /// reads and PINGs don't.
    pub fn pause_writes(&self) {
        let mut c = self.connection();
        redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(600_000)
            .arg("WRITE")
            .query::<()>(&mut c)
            .expect("CLIENT PAUSE");
    }

    /// Ends [`Redis::pause_writes`].
    pub fn unpause(&self) {
        let mut c = self.connection();
        redis::cmd("CLIENT")
            .arg("UNPAUSE")
            .query::<()>(&mut c)
            .expect("CLIENT UNPAUSE");
    }

    /// Makes `key` a plain string: every XADD to it is refused with WRONGTYPE.
    pub fn set_string(&self, key: &str) {
        let mut c = self.connection();
        redis::cmd("SET")
            .arg(key)
            .arg("not a stream")
            .query::<()>(&mut c)
            .expect("SET");
    }

    /// The event id of every entry of `stream`, oldest first, read 10,000 entries at a time.
    pub fn event_ids(&self, stream: &str) -> Vec<String> {
        let mut c = self.connection();
        let mut ids = Vec::new();
        let mut start = "-".to_string();
        // Bounded: far more chunks than any test writes.
        for _ in 0..10_000 {
            let reply: StreamRangeReply = redis::cmd("XRANGE")
                .arg(stream)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(10_000)
                .query(&mut c)
                .expect("XRANGE");
            let Some(last) = reply.ids.last() else {
                break;
            };
            start = format!("({}", last.id);
            ids.extend(reply.ids.iter().map(|e| {
                e.map
                    .get("ce_id")
                    .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                    .unwrap_or_else(|| {
                        let fields = e
                            .map
                            .iter()
                            .filter_map(|(k, v)| {
                                redis::from_redis_value_ref::<String>(v)
                                    .ok()
                                    .map(|v| (k.clone(), v))
                            })
                            .collect();
                        Entry {
                            id: e.id.clone(),
                            fields,
                        }
                        .event_id()
                    })
            }));
        }
        ids
    }

    /// Waits until every id of `expected` is in `stream`, or `deadline` passes, and returns the
    /// stream's event ids either way: a [`Tally`] of them says what is missing.
    pub fn wait_for_ids(
        &self,
        stream: &str,
        expected: &[String],
        deadline: Duration,
    ) -> Vec<String> {
        let want: HashSet<&String> = expected.iter().collect();
        let start = Instant::now();
        loop {
            if self.len(stream) >= want.len() {
                let ids = self.event_ids(stream);
                let have: HashSet<&String> = ids.iter().collect();
                if want.iter().all(|id| have.contains(*id)) {
                    return ids;
                }
            }
            if start.elapsed() >= deadline {
                return self.event_ids(stream);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `stream` holds at least `n` entries and returns them all.
    pub fn wait_entries(&self, stream: &str, n: usize) -> Vec<Entry> {
        wait_for(&format!("{n} entries in {stream}"), DEADLINE, || {
            (self.len(stream) >= n).then_some(())
        });
        self.entries(stream)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One stream entry: its Redis id and its fields as text.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub fields: HashMap<String, String>,
}

impl Entry {
    pub fn get(&self, field: &str) -> Option<&str> {
        self.fields.get(field).map(String::as_str)
    }

    /// `ce_id` in binary mode, or the `id` inside `cloudevent` in structured mode.
    pub fn event_id(&self) -> String {
        if let Some(id) = self.get("ce_id") {
            return id.to_string();
        }
        let body = self.get("cloudevent").expect("ce_id or cloudevent field");
        let v: serde_json::Value = serde_json::from_str(body).expect("cloudevent is JSON");
        v["id"].as_str().expect("id").to_string()
    }
}

static CLUSTER_SEQ: AtomicU32 = AtomicU32::new(0);

pub struct Cluster {
    pub port: u16,
    dir: PathBuf,
    bindir: PathBuf,
    runas: Option<String>,
    /// What [`Cluster::start`] adds to postgresql.conf after the port and socket lines: a
    /// cluster made [`Cluster::init_like`] this one gets the same.
    additions: String,
}

impl Cluster {
    /// A new cluster with broadcaster preloaded, serving database `postgres` and publishing to
    /// `redis_url`; `settings` are added to postgresql.conf. The extension is not created.
    pub fn start(redis_url: &str, settings: &[(&str, &str)]) -> Cluster {
        let cluster = Self::init(redis_url, settings);
        cluster.start_server();
        cluster
    }

    /// The cluster [`Cluster::start`] makes, initialized and configured but not started.
    pub fn init(redis_url: &str, settings: &[(&str, &str)]) -> Cluster {
        Self::init_with(Self::additions(redis_url, settings), pg_bindir(), &[])
    }

    /// [`Cluster::init`] with another PostgreSQL's binaries (`bindir`) and more `initdb`
    /// arguments: the old side of a `pg_upgrade` across major versions.
    pub fn init_with_binaries(
        redis_url: &str,
        settings: &[(&str, &str)],
        bindir: PathBuf,
        initdb_args: &[&str],
    ) -> Cluster {
        Self::init_with(Self::additions(redis_url, settings), bindir, initdb_args)
    }

    /// What the harness adds to postgresql.conf: broadcaster preloaded, `redis_url`, `settings`.
    fn additions(redis_url: &str, settings: &[(&str, &str)]) -> String {
        let mut additions = format!(
            "shared_preload_libraries = 'broadcaster'\n\
             fsync = off\n\
             shared_buffers = '32MB'\n\
             max_connections = 40\n\
             log_line_prefix = '%m [%p] %b '\n\
             broadcaster.redis_url = '{redis_url}'\n"
        );
        for (name, value) in settings {
            additions.push_str(&format!("{name} = '{value}'\n"));
        }
        additions
    }

    /// A second cluster, not started, in its own folder and on its own port, whose
    /// postgresql.conf has the same additions as this one's (shared_preload_libraries and
    /// every broadcaster setting included): the target of a `pg_upgrade`.
    pub fn init_like(&self) -> Cluster {
        Self::init_with(self.additions.clone(), pg_bindir(), &[])
    }

    /// The same with `bindir`'s binaries and more `initdb` arguments: the new side of a
    /// `pg_upgrade` across major versions.
    pub fn init_like_with_binaries(&self, bindir: PathBuf, initdb_args: &[&str]) -> Cluster {
        Self::init_with(self.additions.clone(), bindir, initdb_args)
    }

    /// A fresh folder owned by the cluster's user and a free port; nothing in it yet.
    fn empty(additions: String, bindir: PathBuf) -> Cluster {
        let runas = std::env::var("BROADCASTER_TEST_RUNAS").ok().or_else(|| {
            // PostgreSQL refuses to run as root.
            (nix_uid() == 0).then(|| "postgres".to_string())
        });
        let port = free_port();
        let dir = PathBuf::from(format!(
            "/tmp/bc-e2e-{}-{}",
            std::process::id(),
            CLUSTER_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cluster dir");
        if let Some(user) = &runas {
            run(Command::new("chown").arg(user).arg(&dir));
        }
        Cluster {
            port,
            dir,
            bindir,
            runas,
            additions,
        }
    }

    fn init_with(additions: String, bindir: PathBuf, initdb_args: &[&str]) -> Cluster {
        let cluster = Self::empty(additions, bindir);
        let data = cluster.data().to_string_lossy().into_owned();
        let mut args = vec!["-D", &data, "-U", "postgres", "-A", "trust", "--no-sync"];
        args.extend_from_slice(initdb_args);
        cluster.pg("initdb", &args);
        cluster.append_conf(&format!(
            "{}{}",
            cluster.own_conf_lines(),
            cluster.additions
        ));
        cluster
    }

    /// The lines that differ between two clusters of one test: port and socket folder.
    fn own_conf_lines(&self) -> String {
        format!(
            "port = {}\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n",
            self.port,
            self.dir.display()
        )
    }

    fn append_conf(&self, text: &str) {
        let conf_path = self.data().join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path).expect("postgresql.conf");
        existing.push_str(text);
        // Written as the cluster's owner would: the file keeps its owner.
        std::fs::write(&conf_path, existing).expect("write postgresql.conf");
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn pg(&self, tool: &str, args: &[&str]) {
        let program = self.bindir.join(tool);
        let mut cmd = match &self.runas {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        cmd.args(args).current_dir("/tmp");
        run(&mut cmd);
    }

    pub fn start_server(&self) {
        let data = self.data();
        let log = self.log_path();
        self.pg(
            "pg_ctl",
            &[
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                &data.to_string_lossy(),
                "-l",
                &log.to_string_lossy(),
            ],
        );
    }

    /// `pg_ctl stop` in `mode` (smart, fast, immediate).
    pub fn stop_server(&self, mode: &str) {
        self.pg(
            "pg_ctl",
            &[
                "stop",
                "-w",
                "-t",
                "60",
                "-m",
                mode,
                "-D",
                &self.data().to_string_lossy(),
            ],
        );
    }

    pub fn connect(&self) -> PgClient {
        wait_for("a PostgreSQL connection", DEADLINE, || self.try_connect())
    }

    /// Sets `name` with ALTER SYSTEM and reloads the configuration.
    pub fn set_and_reload(&self, name: &str, value: &str) {
        let mut c = self.connect();
        c.batch_execute(&format!("ALTER SYSTEM SET {name} = '{value}'"))
            .expect("alter system");
        c.batch_execute("SELECT pg_reload_conf()").expect("reload");
    }

    fn try_connect(&self) -> Option<PgClient> {
        self.try_connect_to("postgres")
    }

    fn try_connect_to(&self, database: &str) -> Option<PgClient> {
        let params = format!(
            "host=127.0.0.1 port={} user=postgres dbname={database} connect_timeout=5",
            self.port
        );
        PgClient::connect(&params, postgres::NoTls).ok()
    }

    /// Creates `role` (LOGIN, nothing granted) and connects as it, to `postgres`.
    pub fn connect_as_new_role(&self, role: &str) -> PgClient {
        self.connect()
            .batch_execute(&format!("CREATE ROLE {role} LOGIN"))
            .expect("role");
        PgClient::connect(
            &format!(
                "host=127.0.0.1 port={} user={role} dbname=postgres",
                self.port
            ),
            postgres::NoTls,
        )
        .expect("the new role connects")
    }

    pub fn connect_to(&self, database: &str) -> PgClient {
        wait_for("a PostgreSQL connection", DEADLINE, || {
            self.try_connect_to(database)
        })
    }

    /// Process id of the relay worker, once it runs. Reconnects as needed: the cluster may be
    /// restarting.
    pub fn worker_pid(&self) -> i32 {
        wait_for("the relay worker", DEADLINE, || {
            self.try_connect()?
                .query_opt(
                    "SELECT pid FROM pg_stat_activity WHERE backend_type = 'broadcaster relay'",
                    &[],
                )
                .ok()
                .flatten()
                .map(|row| row.get::<_, i32>(0))
        })
    }

    pub fn wait_healthy(&self, want: bool, deadline: Duration) {
        let mut c = self.connect();
        wait_for(&format!("broadcaster_health() = {want}"), deadline, || {
            let healthy: bool = c.query_one("SELECT broadcaster_health()", &[]).ok()?.get(0);
            (healthy == want).then_some(())
        });
    }

    /// A file name in the cluster's own folder, which the cluster's user can write (a dump).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Length of the server log so far: pass it to [`Cluster::log_since`] to read what came
    /// after.
    pub fn log_len(&self) -> usize {
        std::fs::metadata(self.log_path())
            .map(|m| m.len() as usize)
            .unwrap_or(0)
    }

    /// The server log written after [`Cluster::log_len`] returned `offset`.
    pub fn log_since(&self, offset: usize) -> String {
        let log = self.log();
        log.get(offset..).unwrap_or_default().to_string()
    }

    /// Runs the PostgreSQL program `tool` (pg_dump, pg_upgrade, ...) as the cluster's user, from
    /// the cluster's folder (which that user can write to), and reports how it went without
    /// judging it.
    pub fn run_tool(&self, tool: &str, args: &[&str]) -> ToolRun {
        let program = self.bindir.join(tool);
        let mut cmd = match &self.runas {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        cmd.args(args).current_dir(&self.dir);
        let command = format!("{cmd:?}");
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {command}: {e}"));
        ToolRun {
            command,
            success: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The real `pg_upgrade` from the stopped cluster `old` into this one (initialized, not
    /// started: see [`Cluster::init_like`]), same binaries, copy mode, run as the clusters' user
    /// from this cluster's folder; `--retain` keeps its logs for
    /// [`Cluster::upgrade_server_log`].
    pub fn upgrade_from(&self, old: &Cluster) -> ToolRun {
        let bindir = self.bindir.to_string_lossy().into_owned();
        let old_bindir = old.bindir.to_string_lossy().into_owned();
        let old_port = free_port().to_string();
        let new_port = free_port().to_string();
        self.run_tool(
            "pg_upgrade",
            &[
                "-b",
                &old_bindir,
                "-B",
                &bindir,
                "-d",
                &old.data().to_string_lossy(),
                "-D",
                &self.data().to_string_lossy(),
                "-p",
                &old_port,
                "-P",
                &new_port,
                "-U",
                "postgres",
                "--retain",
            ],
        )
    }

    /// What the servers `pg_upgrade` started wrote (both clusters' servers share one log file,
    /// `pg_upgrade_output.d/<time>/log/pg_upgrade_server.log` in this cluster's data folder).
    pub fn upgrade_server_log(&self) -> String {
        let mut found = Vec::new();
        find_files(
            &self.data().join("pg_upgrade_output.d"),
            "pg_upgrade_server.log",
            4,
            &mut found,
        );
        found.sort();
        found
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap_or_default())
            .collect()
    }

    /// A hot standby of this cluster (`pg_basebackup -R -X stream` over loopback), in its own
    /// folder on its own port, started. Its postgresql.conf is the primary's.
    pub fn start_standby(&self) -> Cluster {
        let standby = Self::empty(self.additions.clone(), self.bindir.clone());
        standby.pg(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-D",
                &standby.data().to_string_lossy(),
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ],
        );
        // The copied postgresql.conf names the primary's port and socket folder: later lines win.
        standby.append_conf(&standby.own_conf_lines());
        standby.start_server();
        standby
    }

    /// `pg_ctl promote`, waiting until the server accepts writes.
    pub fn promote(&self) {
        self.pg(
            "pg_ctl",
            &[
                "promote",
                "-w",
                "-t",
                "60",
                "-D",
                &self.data().to_string_lossy(),
            ],
        );
    }
}

/// How a command-line tool run by [`Cluster::run_tool`] went.
#[derive(Debug)]
pub struct ToolRun {
    pub command: String,
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for ToolRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} exited with {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.code, self.stdout, self.stderr
        )
    }
}

/// Collects the files named `name` under `dir`, at most `depth` folders down.
fn find_files(dir: &std::path::Path, name: &str, depth: u32, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if depth > 0 {
                find_files(&path, name, depth - 1, found);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            found.push(path);
        }
    }
}

/// `(pid, database)` of every backend of `backend_type` (`broadcaster relay`, `broadcaster
/// launcher`, `client backend`) as `c` sees pg_stat_activity now.
pub fn backends(c: &mut PgClient, backend_type: &str) -> Vec<(i32, Option<String>)> {
    c.query(
        "SELECT pid, datname::text FROM pg_stat_activity WHERE backend_type = $1 ORDER BY pid",
        &[&backend_type],
    )
    .expect("pg_stat_activity")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Waits until a backend of `backend_type` connected to `database` (None: to none, as the
/// launcher) runs with a pid other than `not`, and returns its pid.
pub fn wait_backend(
    c: &mut PgClient,
    backend_type: &str,
    database: Option<&str>,
    not: Option<i32>,
    deadline: Duration,
) -> i32 {
    wait_for(
        &format!("a {backend_type} on {database:?} other than {not:?}"),
        deadline,
        || {
            backends(c, backend_type)
                .into_iter()
                .find(|(pid, db)| db.as_deref() == database && Some(*pid) != not)
                .map(|(pid, _)| pid)
        },
    )
}

/// Lines of `text` that contain `needle`.
pub fn lines_with<'a>(text: &'a str, needle: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.contains(needle)).collect()
}

/// Produced against delivered: the ids the test committed (and expects in the stream) against
/// the `ce_id`s the stream holds, one per entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub produced: usize,
    pub delivered: usize,
    /// Entries whose id appeared in an earlier entry.
    pub duplicates: usize,
    /// Produced ids not in the stream.
    pub lost: usize,
    /// Ids in the stream the test never produced.
    pub unexpected: usize,
}

impl Tally {
    pub fn count(produced: &[String], delivered: &[String]) -> Tally {
        let want: HashSet<&String> = produced.iter().collect();
        let unique: HashSet<&String> = delivered.iter().collect();
        Tally {
            produced: want.len(),
            delivered: delivered.len(),
            duplicates: delivered.len() - unique.len(),
            lost: want.iter().filter(|id| !unique.contains(*id)).count(),
            unexpected: unique.iter().filter(|id| !want.contains(*id)).count(),
        }
    }

    /// Prints the tally as a table row and asserts every produced event arrived exactly once
    /// and nothing else did.
    pub fn assert_exactly_once(&self, name: &str) {
        println!(
            "| {name} | {} | {} | {} | {} |",
            self.produced, self.delivered, self.duplicates, self.lost
        );
        assert_eq!(
            (self.duplicates, self.lost, self.unexpected),
            (0, 0, 0),
            "{name}: duplicates, lost, unexpected in {self:?}"
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- server log {} ----\n{}",
                self.log_path().display(),
                self.log()
            );
        }
        let program = self.bindir.join("pg_ctl");
        let data = self.data();
        let mut cmd = match &self.runas {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        let _ = cmd
            .args(["stop", "-m", "immediate", "-D"])
            .arg(&data)
            .current_dir("/tmp")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The binaries of the PostgreSQL whose `pg_config` is `PG_CONFIG` (default: Debian's 15).
pub fn pg_bindir() -> PathBuf {
    let pg_config = std::env::var("PG_CONFIG")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into());
    let out = Command::new(&pg_config)
        .arg("--bindir")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {pg_config}: {e}"));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn nix_uid() -> u32 {
    Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(u32::MAX)
}

/// A cluster and its Redis, with the extension created in `postgres`.
pub struct Setup {
    pub redis: Redis,
    pub cluster: Cluster,
}

impl Setup {
    pub fn new(settings: &[(&str, &str)]) -> Setup {
        Self::with_redis(Redis::start(), settings)
    }

    /// With a Redis that keeps what it acknowledged across kills (see [`Redis::start_persistent`]).
    pub fn persistent(dir: &std::path::Path, settings: &[(&str, &str)]) -> Setup {
        Self::with_redis(Redis::start_persistent(free_port(), dir), settings)
    }

    fn with_redis(redis: Redis, settings: &[(&str, &str)]) -> Setup {
        let cluster = Cluster::start(&redis.url(), settings);
        cluster
            .connect()
            .batch_execute("CREATE EXTENSION broadcaster")
            .expect("CREATE EXTENSION");
        Setup { redis, cluster }
    }
}

pub const DEFAULT_STREAM: &str = "broadcaster:postgres";
