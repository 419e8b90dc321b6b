//! Debian's PostgreSQL 15 under warmer: the PID file the host's tools read
//! (`pg_lsclusters`) names the server as the host sees it. (Here through a
//! `setpriv` wrapper without checkpoints; `tests/sandbox.rs` runs it with
//! `user: postgres` and restores it.)

mod common;

use std::process::Command;

use common::*;

fn lsclusters(name: &str) -> String {
    let out = Command::new("pg_lsclusters").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn pg_lsclusters_sees_postgresql_online_with_its_host_pid() {
    require_criu();
    assert!(
        std::path::Path::new("/usr/lib/postgresql/15/bin/postgres").exists(),
        "PostgreSQL 15 is needed (scripts/deps.sh installs postgresql-15)"
    );
    let env = Env::new();
    let port = free_port();
    let name = format!("warmer{}", std::process::id());
    let created = Command::new("pg_createcluster")
        .args(["15", &name, "-p", &port.to_string()])
        .output()
        .unwrap();
    assert!(created.status.success(), "{created:?}");
    let _cluster = Cluster { name: name.clone() };
    let _ = Command::new("install")
        .args([
            "-d",
            "-o",
            "postgres",
            "-g",
            "postgres",
            "-m",
            "2775",
            "/run/postgresql",
        ])
        .status();
    let pid_file = format!("/var/run/postgresql/15-{name}.pid");
    env.write_manifest(
        "pg",
        &format!(
            "exec: [\"/usr/bin/setpriv\", \"--reuid=postgres\", \"--regid=postgres\", \"--init-groups\", \
             \"/usr/lib/postgresql/15/bin/postgres\", \"-D\", \"/var/lib/postgresql/15/{name}\", \
             \"-c\", \"config_file=/etc/postgresql/15/{name}/postgresql.conf\"]\n\
             ready: {{exec: [\"/usr/bin/pg_isready\", \"-q\", \"-h\", \"127.0.0.1\", \"-p\", \"{port}\"], timeout: 60s}}\n\
             checkpoint: {{enabled: false}}\n\
             pid_file: {pid_file}\n"
        ),
    );
    assert!(
        lsclusters(&name).contains(" down "),
        "{}",
        lsclusters(&name)
    );
    let mut w = env.run("pg");
    let s = env.wait_ready("pg", &mut w);
    // PostgreSQL wrote its namespace PID (2); warmer's rewrite is the host's.
    let in_file: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(s["pid"], in_file, "{s}");
    assert_ne!(in_file, 2);
    let cmdline = std::fs::read_to_string(format!("/proc/{in_file}/cmdline")).unwrap();
    assert!(cmdline.contains("postgres"), "{cmdline}");
    let line = lsclusters(&name);
    assert!(
        line.contains(" online "),
        "pg_lsclusters: {line}\n{}",
        w.err()
    );
    w.stop();
    assert!(
        lsclusters(&name).contains(" down "),
        "{}",
        lsclusters(&name)
    );
    assert!(!std::path::Path::new(&pid_file).exists());
}
