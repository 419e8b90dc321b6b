//! `warmer adopt`: a unit written for the test (a Python service as
//! `nobody` with systemd's sandbox, Environment= and EnvironmentFile=)
//! becomes a manifest that validates, runs cold and restores with the same
//! credentials; `--enable` installs a drop-in that `unadopt` removes,
//! leaving the unit's files exactly as they were. Debian's own units
//! (tomcat10, prometheus, postgresql@) adopt as installed, and a PostgreSQL
//! cluster adopted through its forking unit restores with its rows.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;

const SERVICE: &str = r#"
import http.server, json, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        status = {l.split(":")[0]: l.split(":", 1)[1].strip() for l in open("/proc/self/status")
                  if l.split(":")[0] in ("Uid", "Gid", "CapEff", "CapBnd", "NoNewPrivs")}
        body = json.dumps({"status": status, "greeting": os.environ.get("GREETING"),
                           "argv": sys.argv[1:], "tmp": os.listdir("/tmp")}).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// A directory removed at the end.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every file under `dir` with its contents, sorted.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.push((p.clone(), Vec::new()));
                todo.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn adopt(env: &Env, units: &Path, args: &[&str]) -> std::process::Output {
    env.command()
        .arg("adopt")
        .args(args)
        .env("WARMER_UNIT_PATH", units)
        .output()
        .unwrap()
}

#[test]
fn a_sandboxed_unit_is_adopted_run_restored_enabled_and_unadopted() {
    require_criu();
    let env = Env::new();
    let srv = Dir(PathBuf::from(format!(
        "/srv/warmer-adopt-test-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(srv.0.join("data")).unwrap();
    std::fs::set_permissions(&srv.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(srv.0.join("svc.py"), SERVICE).unwrap();
    let port = free_port();
    std::fs::write(srv.0.join("env"), format!("PORT={port}\n")).unwrap();
    let units = env.path("units");
    std::fs::create_dir(&units).unwrap();
    let unit = format!(
        "[Unit]\nDescription=a test service\n\n[Service]\nType=simple\nUser=nobody\n\
         Environment=\"GREETING=hello world\"\n\
         EnvironmentFile={srv}/env\n\
         ExecStart=/usr/bin/python3 {srv}/svc.py $PORT\n\
         PrivateTmp=yes\nProtectSystem=strict\nReadWritePaths={srv}/data\nNoNewPrivileges=yes\n\
         MemoryDenyWriteExecute=yes\nRestart=on-failure\n\n[Install]\nWantedBy=multi-user.target\n",
        srv = srv.0.display()
    );
    std::fs::write(units.join("adoptee.service"), &unit).unwrap();
    let before = snapshot(&units);

    // No --ready: a trial start finds the one port it listens on, and
    // leaves nothing running.
    let out = adopt(&env, &units, &["adoptee"]);
    assert!(out.status.success(), "{out:?}");
    let manifest = std::fs::read_to_string(env.path("manifests/adoptee.yaml")).unwrap();
    assert!(
        manifest.contains(&format!("tcp: \"127.0.0.1:{port}\""))
            && manifest.contains("trial start"),
        "{manifest}"
    );
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "the trial's service was stopped"
    );
    let ready = format!("http://127.0.0.1:{port}/");
    assert!(
        manifest.contains("MemoryDenyWriteExecute"),
        "listed as not carried:\n{manifest}"
    );
    assert!(
        manifest.contains(&format!("\"{}\"", port)),
        "$PORT expanded from the file:\n{manifest}"
    );
    assert!(
        !manifest.contains(&format!("PORT={port}")),
        "the file's values stay in the file"
    );
    let validate = env
        .command()
        .args(["validate"])
        .arg(env.path("manifests/adoptee.yaml"))
        .output()
        .unwrap();
    assert!(validate.status.success(), "{validate:?}");
    let again = adopt(&env, &units, &["adoptee", "--ready", &ready]);
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("--force"),
        "{again:?}"
    );

    let mut w = env.run("adoptee");
    env.wait_image("adoptee", &mut w);
    let cold: serde_json::Value = serde_json::from_str(&get(port, "/").unwrap()).unwrap();
    assert_eq!(
        cold["status"]["Uid"], "65534\t65534\t65534\t65534",
        "{cold}"
    );
    assert_eq!(cold["status"]["NoNewPrivs"], "1");
    assert_eq!(cold["greeting"], "hello world");
    assert_eq!(cold["argv"], serde_json::json!([port.to_string()]));
    w.stop();
    let mut w = env.run("adoptee");
    let s = env.wait_ready("adoptee", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    let restored: serde_json::Value = serde_json::from_str(&get(port, "/").unwrap()).unwrap();
    assert_eq!(restored["status"], cold["status"], "the same credentials");
    w.stop();

    // Under its own name: the drop-in, and back.
    let out = adopt(
        &env,
        &units,
        &["adoptee", "--ready", &ready, "--force", "--enable"],
    );
    assert!(out.status.success(), "{out:?}");
    let dropin =
        std::fs::read_to_string(units.join("adoptee.service.d/warmer-adopt.conf")).unwrap();
    assert!(
        dropin.contains("ExecStart=\nExecStart=") && dropin.contains(" run adoptee\n"),
        "{dropin}"
    );
    assert!(
        dropin.contains("Type=notify") && dropin.contains("User=\n"),
        "{dropin}"
    );
    let out = env
        .command()
        .args(["unadopt", "adoptee"])
        .env("WARMER_UNIT_PATH", &units)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(snapshot(&units), before, "the unit's files as they were");
}

#[test]
fn debians_units_adopt_as_installed() {
    let env = Env::new();
    for (unit, args) in [
        ("tomcat10", vec!["--ready", "http://127.0.0.1:8080/"]),
        (
            "prometheus",
            vec![
                "--ready",
                "http://127.0.0.1:9090/-/ready",
                "--mode",
                "persist",
            ],
        ),
    ] {
        assert!(
            Path::new(&format!("/lib/systemd/system/{unit}.service")).exists(),
            "Debian's {unit} is needed (scripts/deps.sh installs it)"
        );
        let out = env
            .command()
            .arg("adopt")
            .arg(unit)
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{unit}: {out:?}");
        let path = env.path(&format!("manifests/{unit}.yaml"));
        let m = std::fs::read_to_string(&path).unwrap();
        assert!(m.contains("user: "), "{unit}: {m}");
        let validate = env.command().arg("validate").arg(&path).output().unwrap();
        assert!(validate.status.success(), "{unit}: {validate:?}");
    }
    // Debian's PostgreSQL unit (Type=forking, pg_ctlcluster) adopts as
    // installed: the cluster's postgres in the foreground, as its owner.
    let out = env
        .command()
        .args(["adopt", "postgresql@15-main"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let path = env.path("manifests/postgresql-15-main.yaml");
    let m = std::fs::read_to_string(&path).unwrap();
    assert!(
        m.contains("\"/usr/lib/postgresql/15/bin/postgres\", \"-D\"")
            && m.contains("user: \"postgres\""),
        "{m}"
    );
    let validate = env.command().arg("validate").arg(&path).output().unwrap();
    assert!(validate.status.success(), "{validate:?}");
}

/// A forking unit whose launcher warmer does not know is refused with what
/// to pass; with `--exec` it adopts, and the rest of the unit carries over.
#[test]
fn a_forking_unit_needs_its_foreground_command() {
    let env = Env::new();
    let units = env.path("units");
    std::fs::create_dir(&units).unwrap();
    std::fs::write(
        units.join("legacy.service"),
        "[Service]\nType=forking\nUser=nobody\nPIDFile=/run/legacy.pid\n\
         ExecStart=/usr/sbin/legacyd --daemon\nExecStop=/usr/sbin/legacyd --stop\nPrivateTmp=yes\n",
    )
    .unwrap();
    let refused = adopt(&env, &units, &["legacy", "--ready", "tcp:127.0.0.1:9"]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("Type=forking") && why.contains("--exec"),
        "{why}"
    );
    let out = adopt(
        &env,
        &units,
        &[
            "legacy",
            "--ready",
            "tcp:127.0.0.1:9",
            "--exec",
            "/usr/bin/python3 -m http.server 'a b'",
            "--enable",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let m = std::fs::read_to_string(env.path("manifests/legacy.yaml")).unwrap();
    assert!(
        m.contains("exec: [\"/usr/bin/python3\", \"-m\", \"http.server\", \"a b\"]")
            && m.contains("user: \"nobody\"")
            && m.contains("private_tmp: true"),
        "{m}"
    );
    // The unit's ExecStop would stop the daemon its own way: warmer does.
    let dropin = std::fs::read_to_string(units.join("legacy.service.d/warmer-adopt.conf")).unwrap();
    assert!(dropin.contains("\nExecStop=\n"), "{dropin}");
    let relative = adopt(&env, &units, &["legacy", "--force", "--exec", "legacyd -f"]);
    assert!(!relative.status.success());
}

/// Debian's `postgresql@.service` for a cluster of the test's own, adopted
/// as installed, in persist mode: postgres runs as postgres, restores, and
/// keeps every committed row; the PID file pg_ctlcluster's tools read names
/// its host PID.
#[test]
fn a_debian_postgresql_cluster_adopted_restores_with_its_rows() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    let name = format!("adopt{}", std::process::id());
    let created = std::process::Command::new("pg_createcluster")
        .args(["15", &name, "-p", &port.to_string()])
        .output()
        .unwrap();
    assert!(created.status.success(), "{created:?}");
    let _cluster = Cluster { name: name.clone() };
    let out = env
        .command()
        .args([
            "adopt",
            &format!("postgresql@15-{name}"),
            "--mode",
            "persist",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let service = format!("postgresql-15-{name}");
    // Persist mode: the image is taken at the stop.
    let mut w = env.run(&service);
    env.wait_ready(&service, &mut w);
    psql(port, "CREATE TABLE t (v int); INSERT INTO t VALUES (1);");
    w.stop();
    let mut w = env.run(&service);
    let s = env.wait_ready(&service, &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    assert_eq!(psql(port, "SELECT sum(v) FROM t"), "1");
    let pid = s["pid"].as_i64().unwrap();
    let owner = std::fs::metadata(format!("/proc/{pid}")).unwrap().uid();
    assert_eq!(
        Some(owner),
        nix::unistd::User::from_name("postgres")
            .unwrap()
            .map(|u| u.uid.as_raw()),
        "restored as postgres"
    );
    // Its dynamic shared memory is in its own /dev/shm (saved in the
    // image), not the host's, which a reboot empties.
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let segment = maps
        .lines()
        .find_map(|l| {
            l.split_whitespace()
                .last()
                .filter(|p| p.starts_with("/dev/shm/PostgreSQL."))
        })
        .expect("a dynamic shared memory segment")
        .to_string();
    assert!(
        !std::path::Path::new(&segment).exists(),
        "{segment} is on the host"
    );
    let pid_file = std::fs::read_to_string(format!("/var/run/postgresql/15-{name}.pid")).unwrap();
    assert_eq!(
        pid_file.trim(),
        pid.to_string(),
        "the host PID for pg_lsclusters"
    );
    w.stop();
}

/// A service that listens on two ports: the trial cannot choose its probe
/// and says which ports it saw; nothing is left running.
#[test]
fn a_trial_start_that_listens_twice_asks_for_ready() {
    require_criu();
    let env = Env::new();
    let units = env.path("units");
    std::fs::create_dir(&units).unwrap();
    let (a, b) = (free_port(), free_port());
    std::fs::write(
        units.join("twice.service"),
        format!(
            "[Service]\nUser=nobody\nExecStart=/usr/bin/python3 -c \"import socket,time; \
             ss=[socket.create_server(('127.0.0.1',p)) for p in ({a},{b})]; time.sleep(600)\"\n"
        ),
    )
    .unwrap();
    let out = adopt(&env, &units, &["twice"]);
    assert!(!out.status.success());
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(
        why.contains(&format!("127.0.0.1:{a}"))
            && why.contains(&format!("127.0.0.1:{b}"))
            && why.contains("--ready"),
        "{why}"
    );
    assert!(!env.path("manifests/twice.yaml").exists());
    assert!(std::net::TcpListener::bind(("127.0.0.1", a)).is_ok());
}
