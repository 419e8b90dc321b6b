//! A service run as its unit runs it: its own user, its sandbox, its own
//! /proc and /tmp, cold and restored, with real CRIU, on a machine whose
//! root lacks CAP_SYS_RESOURCE (this VM: a dump of another user's process
//! fails there without warmer's user namespace). Real PostgreSQL 15 as
//! `postgres` in persist mode.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use common::*;

/// What the service reports about itself, from inside.
const SERVICE: &str = r#"
import ctypes, http.server, json, os, sys
port, data = int(sys.argv[1]), sys.argv[2]
open("/tmp/mine", "w").write("kept in the image")
def attempt(f):
    try:
        f(); return "ok"
    except OSError as e:
        return e.strerror
libc = ctypes.CDLL(None, use_errno=True)
def setuid0():
    if libc.setuid(0) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        status = {}
        for l in open("/proc/self/status"):
            k, _, v = l.partition(":")
            if k in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd",
                     "CapAmb", "NoNewPrivs", "Seccomp", "Umask"):
                status[k] = v.strip()
        limits = [l for l in open("/proc/self/limits") if l.startswith("Max open files")]
        mounts = sorted(" ".join(l.split()[4:6]) for l in open("/proc/self/mountinfo"))
        body = json.dumps({
            "status": status, "limits": limits, "mounts": mounts,
            "pid": os.getpid(), "proc_self": os.readlink("/proc/self"),
            "proc_pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
            "tmp": sorted(os.listdir("/tmp")),
            "write_etc": attempt(lambda: open("/etc/warmer-sandbox-test", "w")),
            "write_data": attempt(lambda: open(os.path.join(data, "written"), "w")),
            "setuid0": attempt(setuid0),
            "restore_info": attempt(lambda: open(os.environ["WARMER_RESTORE_INFO"]).read()),
        }).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"#;

fn info(port: u16) -> serde_json::Value {
    serde_json::from_str(&get(port, "/").expect("the service answers")).unwrap()
}

/// Host mounts whose path contains `needle` (none may be left behind).
fn host_mounts_with(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(needle))
        .map(String::from)
        .collect()
}

#[test]
fn another_users_service_runs_sandboxed_and_restores_with_the_same_credentials_and_mounts() {
    require_criu();
    let mut env = Env::new();
    // Outside /tmp (the service gets its own) and reachable by its user, as
    // /run/warmer and /srv are.
    let run = Removed(std::path::PathBuf::from(format!(
        "/run/warmer-run-test-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&run.0).unwrap();
    env.run = run.0.clone();
    let srv = Removed(std::path::PathBuf::from(format!(
        "/srv/warmer-test-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&srv.0).unwrap();
    std::fs::set_permissions(&srv.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = srv.0.join("who.py");
    std::fs::write(&script, SERVICE).unwrap();
    let data = srv.0.join("data");
    std::fs::create_dir(&data).unwrap();
    // A read-only bind of a writable host directory (CRIU binds it again
    // writable: warmer makes it read-only again).
    let ro = srv.0.join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::os::unix::fs::chown(&data, Some(65534), Some(65534)).unwrap();
    // A host file in /tmp the service must not see.
    let marker = format!("/tmp/warmer-host-only-{}", std::process::id());
    std::fs::write(&marker, "host").unwrap();
    let port = free_port();
    let runtime = format!("warmer-test-{}", std::process::id());
    env.write_manifest(
        "who",
        &format!(
            "exec: [\"/usr/bin/python3\", \"{script}\", \"{port}\", \"{data}\"]\n\
             user: nobody\n\
             exec_start_pre:\n\
             \x20 - [\"+/bin/sh\", \"-c\", \"id -u > {data}/pre-root\"]\n\
             \x20 - [\"/bin/sh\", \"-c\", \"id -u > {data}/pre-user\"]\n\
             ready: {{http: \"http://127.0.0.1:{port}/\", timeout: 30s}}\n\
             checkpoint: {{settle: 100ms}}\n\
             hooks: {{after_restore: [\"/bin/sh\", \"-c\", \"id -u > {data}/hook-uid\"]}}\n\
             sandbox:\n\
             \x20 private_tmp: true\n\
             \x20 protect_system: strict\n\
             \x20 read_write_paths: [\"{data}\"]\n\
             \x20 read_only_paths: [\"{ro}\"]\n\
             \x20 no_new_privileges: true\n\
             \x20 capability_bounding_set: [CAP_CHOWN]\n\
             \x20 umask: \"0027\"\n\
             \x20 runtime_directory: [\"{runtime}\"]\n\
             \x20 limit_nofile: \"512:1024\"\n",
            script = script.display(),
            data = data.display(),
            ro = ro.display(),
        ),
    );
    let mut w = env.run("who");
    env.wait_image("who", &mut w);
    // Its own tmpfs that were empty at the dump (/var/tmp, /dev/shm) are
    // made afresh at restore; /tmp, which it wrote, travels in the image.
    let entry = env.entries().pop().expect("an image");
    let restore_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(entry.join("data/restore.json")).unwrap()).unwrap();
    let empty: Vec<&str> = restore_json["empty_tmpfs"]
        .as_array()
        .expect("empty_tmpfs")
        .iter()
        .map(|t| t["path"].as_str().unwrap())
        .collect();
    assert!(
        empty.contains(&"/var/tmp") && empty.contains(&"/dev/shm") && !empty.contains(&"/tmp"),
        "{restore_json}"
    );
    assert!(
        std::fs::read_dir(entry.join("data"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("tmpfs-"))
            .count()
            == 1,
        "only /tmp's contents packed"
    );
    let cold = info(port);
    let st = &cold["status"];
    assert_eq!(st["Uid"], "65534\t65534\t65534\t65534", "{cold}");
    assert_eq!(st["NoNewPrivs"], "1");
    assert_eq!(st["CapBnd"], "0000000000000001", "only CAP_CHOWN");
    assert_eq!(st["CapEff"], "0000000000000000");
    assert_eq!(st["Umask"], "0027");
    assert!(
        cold["limits"][0].as_str().unwrap().contains("512"),
        "{cold}"
    );
    // Its own /proc: it is PID 2 of its namespace and sees only that.
    assert_eq!(cold["pid"], 2);
    assert_eq!(cold["proc_self"], "2");
    assert!(cold["proc_pids"].as_array().unwrap().len() <= 3, "{cold}");
    // Its own /tmp; the host's is not there (but for the build tree that
    // holds warmer-init, when it is below /tmp: bound in, read-only).
    let mut own_tmp = vec!["mine".to_string()];
    if let Ok(build) = std::path::Path::new(env!("CARGO_BIN_EXE_warmer")).strip_prefix("/tmp") {
        own_tmp.push(build.iter().next().unwrap().to_string_lossy().into_owned());
        own_tmp.sort();
    }
    assert_eq!(cold["tmp"], serde_json::json!(own_tmp), "{cold}");
    assert_eq!(cold["write_etc"], "Read-only file system");
    assert_eq!(cold["write_data"], "ok");
    assert_eq!(cold["setuid0"], "Operation not permitted");
    // The steps before it: `+` as root, the other as the service.
    assert_eq!(
        std::fs::read_to_string(data.join("pre-root"))
            .unwrap()
            .trim(),
        "0"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("pre-user"))
            .unwrap()
            .trim(),
        "65534"
    );
    // The runtime directory, the user's.
    let rt = std::path::Path::new("/run").join(&runtime);
    assert_eq!(std::fs::metadata(&rt).unwrap().uid(), 65534);
    w.stop();

    let mut w = env.run("who");
    let s = env.wait_ready("who", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    let restored = info(port);
    assert_eq!(restored["status"], cold["status"], "the same credentials");
    assert_eq!(restored["limits"], cold["limits"]);
    assert_eq!(restored["mounts"], cold["mounts"], "the same mounts");
    let ro_line = format!("{} ro,relatime", ro.display());
    assert!(
        restored["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == &serde_json::json!(ro_line)),
        "read_only_paths stay read-only: {restored}"
    );
    assert_eq!(
        restored["proc_self"], "2",
        "its own /proc again: {restored}"
    );
    assert!(
        restored["proc_pids"].as_array().unwrap().len() <= 3,
        "{restored}"
    );
    assert_eq!(
        restored["tmp"],
        serde_json::json!(own_tmp),
        "the private /tmp came back"
    );
    assert_eq!(restored["write_etc"], "Read-only file system");
    assert_eq!(restored["setuid0"], "Operation not permitted");
    assert_eq!(
        restored["restore_info"], "ok",
        "the restore-info file is readable by its user"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("hook-uid"))
            .unwrap()
            .trim(),
        "65534",
        "its hook ran as it runs"
    );
    w.stop();

    // The same restore where the kernel takes no proc `pidns=` (before
    // 6.15): the /proc and the read-only mounts made by a child in the
    // tree's namespaces instead.
    let mut w = env.run_with("who", &[("WARMER_FAILPOINT", "proc-without-pidns")]);
    let s = env.wait_ready("who", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    let again = info(port);
    assert_eq!(again["status"], cold["status"]);
    assert_eq!(again["mounts"], cold["mounts"], "the same mounts");
    assert_eq!(again["proc_self"], "2", "its own /proc: {again}");
    assert!(again["proc_pids"].as_array().unwrap().len() <= 3, "{again}");
    w.stop();
    // Nothing of the namespaces is left on the host.
    assert_eq!(
        host_mounts_with(&env.run.display().to_string()),
        Vec::<String>::new()
    );
    let _ = std::fs::remove_file(&marker);
    let _ = std::fs::remove_dir(&rt);
}

#[test]
fn a_sandboxed_service_restores_lazily_with_its_credentials_and_memory() {
    require_criu();
    require_lazy_in_userns();
    // (With vm.unprivileged_userfaultfd=0, as here and by default, the tree
    // gets its userfaultfd from /dev/userfaultfd or not at all.)
    let mut env = Env::new();
    let (port, _dirs) = sandboxed_memory_service(&mut env, "big", "");
    let mut w = env.run("big");
    env.wait_image("big", &mut w);
    let cold = memory_report(port);
    assert_eq!(
        cold["status"]["Uid"], "65534\t65534\t65534\t65534",
        "{cold}"
    );
    w.stop();

    for (round, how) in [(1, "lazy (auto:"), (2, "working set first (auto:")] {
        let mut w = env.run("big");
        let s = env.wait_ready("big", &mut w);
        assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
        assert!(w.err().contains(how), "round {round}: {}", w.err());
        let rec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(env.run.join("big/state.json")).unwrap())
                .unwrap();
        assert_eq!(rec["restore_choice"]["lazy"], true, "round {round}: {rec}");
        let restored = memory_report(port);
        assert_eq!(
            restored["status"], cold["status"],
            "round {round}: the same credentials"
        );
        assert_eq!(
            restored["first"], cold["first"],
            "round {round}: its memory"
        );
        w.stop();
        let marker = env.dir.path().display().to_string();
        assert!(
            pids_with(&marker).is_empty(),
            "round {round}: service left running"
        );
        assert!(
            pids_with("lazy-pages").iter().all(|p| {
                !std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .unwrap_or_default()
                    .contains(&marker)
            }),
            "round {round}: lazy-pages daemon left running"
        );
    }
}

#[test]
fn postgresql_as_postgres_in_persist_mode_keeps_committed_rows_across_restores() {
    require_criu();
    assert!(
        std::path::Path::new("/usr/lib/postgresql/15/bin/postgres").exists(),
        "PostgreSQL 15 is needed (scripts/deps.sh installs postgresql-15)"
    );
    let env = Env::new();
    let port = free_port();
    let name = format!("sbx{}", std::process::id());
    let created = Command::new("pg_createcluster")
        .args(["15", &name, "-p", &port.to_string()])
        .output()
        .unwrap();
    assert!(created.status.success(), "{created:?}");
    let _cluster = Cluster { name: name.clone() };
    let data = format!("/var/lib/postgresql/15/{name}");
    env.write_manifest(
        "pg",
        &format!(
            "exec: [\"/usr/lib/postgresql/15/bin/postgres\", \"-D\", \"{data}\", \
             \"-c\", \"config_file=/etc/postgresql/15/{name}/postgresql.conf\"]\n\
             user: postgres\n\
             mode: persist\n\
             state: [\"{data}\"]\n\
             ready: {{exec: [\"/usr/bin/pg_isready\", \"-q\", \"-h\", \"127.0.0.1\", \"-p\", \"{port}\"], timeout: 60s}}\n\
             sandbox:\n\
             \x20 private_tmp: true\n\
             \x20 protect_system: full\n\
             \x20 runtime_directory: [postgresql]\n"
        ),
    );
    let mut w = env.run("pg");
    env.wait_ready("pg", &mut w);
    psql(port, "CREATE TABLE t (v int); INSERT INTO t VALUES (1);");
    w.stop();
    let mut w = env.run("pg");
    let s = env.wait_ready("pg", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    assert_eq!(psql(port, "SELECT sum(v) FROM t"), "1");
    psql(port, "INSERT INTO t VALUES (2);");
    let pid = s["pid"].as_i64().unwrap();
    let uid = std::fs::metadata(format!("/proc/{pid}")).unwrap().uid();
    assert_eq!(
        Some(uid),
        nix::unistd::User::from_name("postgres")
            .unwrap()
            .map(|u| u.uid.as_raw()),
        "restored as postgres"
    );
    w.stop();
    let mut w = env.run("pg");
    let s = env.wait_ready("pg", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    assert_eq!(
        psql(port, "SELECT sum(v) FROM t"),
        "3",
        "the row committed after the restore"
    );
    w.stop();
    // Nothing root-owned left in the package's data directory.
    let out = Command::new("find")
        .args([&data, "-user", "root"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "",
        "root-owned files"
    );
}

/// The status lines a restore must give back, of the process whose command
/// line contains `needle`.
fn credentials_of(needle: &str) -> String {
    // Looked for by its command line, which a lazily restored process's
    // /proc/PID/cmdline may not show until the page holding its arguments
    // has arrived: a few seconds at most.
    let t = std::time::Instant::now();
    let pid = loop {
        match pids_with(needle).first() {
            Some(p) => break *p,
            None if t.elapsed() < std::time::Duration::from_secs(10) => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            None => panic!("no process with {needle:?} in its command line"),
        }
    };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter(|l| {
            ["Uid:", "Gid:", "Groups:", "Cap", "NoNewPrivs:", "Seccomp:"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A manifest of `manifests/` installed into `env` as is.
fn installed_manifest(env: &Env, name: &str) {
    let text = std::fs::read_to_string(repo().join(format!("manifests/{name}.yaml"))).unwrap();
    env.write_manifest(name, &text);
}

#[test]
fn debians_tomcat10_runs_as_tomcat_under_its_units_sandbox_and_restores_so() {
    require_criu();
    assert!(
        std::path::Path::new("/usr/libexec/tomcat10/tomcat-start.sh").exists(),
        "Debian's tomcat10 is needed (scripts/deps.sh installs it)"
    );
    let env = Env::new();
    installed_manifest(&env, "tomcat10");
    let mut w = env.run("tomcat10");
    env.wait_image("tomcat10", &mut w);
    let cold = credentials_of("org.apache.catalina");
    let tomcat = nix::unistd::User::from_name("tomcat").unwrap().unwrap();
    assert!(cold.contains(&format!("Uid:\t{}", tomcat.uid)), "{cold}");
    assert!(
        cold.contains("CapAmb:\t0000000000000400"),
        "CAP_NET_BIND_SERVICE: {cold}"
    );
    assert!(cold.contains("NoNewPrivs:\t1"), "{cold}");
    w.stop();
    let mut w = env.run("tomcat10");
    let s = env.wait_ready("tomcat10", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    assert_eq!(
        credentials_of("org.apache.catalina"),
        cold,
        "the same credentials"
    );
    assert!(get(8080, "/").is_some(), "tomcat answers after the restore");
    w.stop();
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[test]
fn debians_prometheus_restored_as_prometheus_reports_its_own_process() {
    require_criu();
    assert!(
        std::path::Path::new("/usr/bin/prometheus").exists(),
        "Debian's prometheus is needed (scripts/deps.sh installs it)"
    );
    let env = Env::new();
    installed_manifest(&env, "prometheus");
    // Persist mode: the image is taken at the stop.
    let mut w = env.run("prometheus");
    env.wait_ready("prometheus", &mut w);
    std::thread::sleep(std::time::Duration::from_secs(2));
    w.stop();
    let mut w = env.run("prometheus");
    let s = env.wait_ready("prometheus", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    let pid = s["pid"].as_i64().unwrap();
    let metrics = get(9090, "/metrics").unwrap();
    // Its own /proc: the process it describes is the one running now.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let ticks: f64 = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    let boot: f64 = std::fs::read_to_string("/proc/stat")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
        .unwrap();
    let started = boot + ticks / 100.0;
    let reported = metric(&metrics, "process_start_time_seconds");
    assert!(
        (reported - started).abs() < 2.0,
        "reported {reported}, its process {started}"
    );
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as f64;
    let open = metric(&metrics, "process_open_fds");
    assert!(
        open > 0.0 && (open - fds).abs() <= 4.0,
        "open_fds {open}, /proc says {fds}"
    );
    assert!(metric(&metrics, "process_resident_memory_bytes") > 1e6);
    let uid = std::fs::metadata(format!("/proc/{pid}")).unwrap().uid();
    let prometheus = nix::unistd::User::from_name("prometheus").unwrap().unwrap();
    assert_eq!(uid, prometheus.uid.as_raw());
    w.stop();
}
