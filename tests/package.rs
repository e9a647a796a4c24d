//! The Debian package (`scripts/package.sh`) on a machine that has only the PostgreSQL server:
//! a copy of the clean Debian 12 root `scripts/setup.sh` made with `debootstrap --variant=minbase
//! --include=postgresql-15` (no Rust, no compiler), the package installed there with
//! `apt-get install ./...deb`, then, in that root, a cluster preloading broadcaster,
//! `CREATE EXTENSION`, and an event relayed to a Redis on the host's loopback (a chroot shares
//! the host's network). Needs root (chroot), as `scripts/test.sh` runs here.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Redis, DEFAULT_STREAM};

/// Where `scripts/setup.sh` keeps the clean root; copied, never changed.
const CLEAN_ROOT: &str = "/var/cache/broadcaster/debian12-postgresql15";

/// Removes the copied root on drop, after stopping any cluster left running in it.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let root = self.0.join("root");
        if root.join("tmp/data/postmaster.pid").exists() {
            let _ = Command::new("chroot")
                .arg(&root)
                .args(["runuser", "-u", "postgres", "--"])
                .args([
                    "/usr/lib/postgresql/15/bin/pg_ctl",
                    "-D",
                    "/tmp/data",
                    "-m",
                    "immediate",
                    "stop",
                ])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `program args` in `root` (chroot), as `user` when given; panics with its output if it
/// fails.
fn in_root(root: &Path, user: Option<&str>, program: &str, args: &[&str]) -> String {
    let mut cmd = Command::new("chroot");
    cmd.arg(root);
    if let Some(user) = user {
        cmd.args(["runuser", "-u", user, "--"]);
    }
    let out = cmd
        .arg(program)
        .args(args)
        .output()
        .expect("chroot is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{program} {args:?} in {}:\n{text}",
        root.display()
    );
    text
}

#[test]
#[cfg_attr(
    not(feature = "pg15"),
    ignore = "the package is for Debian's PostgreSQL 15: runs in the pass on 15"
)]
fn the_debian_package_installs_on_a_machine_with_only_the_server_and_relays() {
    let clean = Path::new(CLEAN_ROOT);
    assert!(
        clean.join("usr/lib/postgresql/15/bin/postgres").exists(),
        "{CLEAN_ROOT} holds a Debian 12 root with PostgreSQL 15 (scripts/setup.sh makes it)"
    );
    for tool in ["gcc", "cc", "cargo", "rustc"] {
        assert!(
            !clean.join("usr/bin").join(tool).exists(),
            "the clean root has no {tool}"
        );
    }
    // The package, built as a user would.
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(repo.join("scripts/package.sh"))
        .arg("15")
        .current_dir(&repo)
        .output()
        .expect("bash");
    let log = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "scripts/package.sh 15:\n{log}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = log
        .lines()
        .find_map(|l| {
            let path = l.strip_prefix("package: ")?.split(' ').next()?;
            path.ends_with(".deb").then(|| repo.join(path))
        })
        .expect("package.sh names the package it built");

    let scratch = PathBuf::from(format!("/tmp/bc-package-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).expect("scratch");
    let guard = Scratch(scratch.clone());
    let root = scratch.join("root");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(clean)
        .arg(&root)
        .status()
        .expect("cp");
    assert!(copied.success(), "copy the clean root");
    let file_name = deb
        .file_name()
        .expect("a file")
        .to_string_lossy()
        .into_owned();
    std::fs::copy(&deb, root.join("tmp").join(&file_name)).expect("the package into the root");
    in_root(
        &root,
        None,
        "apt-get",
        &["install", "-y", "-q", &format!("/tmp/{file_name}")],
    );
    assert!(root
        .join("usr/lib/postgresql/15/lib/broadcaster.so")
        .exists());

    let redis = Redis::start();
    let port = common::free_port();
    in_root(
        &root,
        Some("postgres"),
        "/usr/lib/postgresql/15/bin/initdb",
        &[
            "-D",
            "/tmp/data",
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
        ],
    );
    let conf = root.join("tmp/data/postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).expect("postgresql.conf");
    text.push_str(&format!(
        "port = {port}\n\
         listen_addresses = '127.0.0.1'\n\
         unix_socket_directories = '/tmp'\n\
         dynamic_shared_memory_type = mmap\n\
         shared_preload_libraries = 'broadcaster'\n\
         broadcaster.redis_url = '{}'\n\
         broadcaster.poll_interval = '200ms'\n",
        redis.url()
    ));
    std::fs::write(&conf, text).expect("postgresql.conf");
    in_root(
        &root,
        Some("postgres"),
        "/usr/lib/postgresql/15/bin/pg_ctl",
        &["-D", "/tmp/data", "-l", "/tmp/postgres.log", "-w", "start"],
    );
    let result = std::panic::catch_unwind(|| {
        let mut c = common::PgClient::connect(
            &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
            postgres::NoTls,
        )
        .expect("connect to the cluster in the root");
        c.batch_execute("CREATE EXTENSION broadcaster")
            .expect("CREATE EXTENSION from the package");
        let id: String = c
            .query_one(
                "SELECT broadcaster_publish('from.the.package', '{\"v\": 1}')::text",
                &[],
            )
            .expect("publish")
            .get(0);
        assert_eq!(redis.wait_entries(DEFAULT_STREAM, 1)[0].event_id(), id);
    });
    if result.is_err() {
        let log = std::fs::read_to_string(root.join("tmp/postgres.log")).unwrap_or_default();
        eprintln!("the cluster's log in the root:\n{log}");
    }
    drop(guard);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
