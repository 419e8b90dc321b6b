//! Test harness: a private manifest/cache/run directory per test, the real
//! `warmer` binary, the real example service, real CRIU.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const WARMER: &str = env!("CARGO_BIN_EXE_warmer");

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Checkpoint tests need root and a working CRIU >= 4.2. They fail loudly
/// (never pass silently) when that is missing.
pub fn require_criu() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (CRIU checkpoints need CAP_SYS_ADMIN and friends); run the README's test command as root"
    );
    let out = Command::new(WARMER)
        .arg("check")
        .output()
        .expect("run warmer check");
    assert!(
        out.status.success(),
        "CRIU is not usable here; run scripts/install-criu.sh. warmer check said:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One isolated warmer installation.
pub struct Env {
    pub dir: tempfile::TempDir,
    /// WARMER_RUN_DIR: `<dir>/run`, or another node's (see [`Env::node_like`]).
    pub run: PathBuf,
}

impl Env {
    pub fn new() -> Self {
        // Not under /tmp: a sandboxed restore's CRIU then gets a /tmp of
        // its own (`Sources::scratch_tmp`), as it does with /var/cache and
        // /run/warmer, so the tests take that path.
        let dir = tempfile::Builder::new()
            .prefix("warmer-test-")
            .tempdir_in("/var/tmp")
            .unwrap();
        for d in ["manifests", "cache", "run", "app"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let run = dir.path().join("run");
        Self { dir, run }
    }

    /// Another machine with the same installation: its own manifests and
    /// cache, and the same run directory path as `other` (as every node's is
    /// /run/warmer), emptied: run `other`'s services no more after this.
    pub fn node_like(other: &Env) -> Self {
        let mut env = Env::new();
        std::fs::remove_dir_all(&other.run).unwrap();
        std::fs::create_dir(&other.run).unwrap();
        env.run = other.run.clone();
        for m in std::fs::read_dir(other.path("manifests")).unwrap() {
            let m = m.unwrap().path();
            std::fs::copy(&m, env.path("manifests").join(m.file_name().unwrap())).unwrap();
        }
        env
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Copies the example service into this env (so tests can change it).
    pub fn app(&self) -> PathBuf {
        let script = self.path("app/server.py");
        if !script.exists() {
            std::fs::copy(repo().join("examples/slowweb/server.py"), &script).unwrap();
        }
        script
    }

    pub fn write_manifest(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path("manifests").join(format!("{name}.yaml"));
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A slowweb manifest on `port` with extra server args and manifest lines.
    pub fn slowweb(&self, name: &str, port: u16, args: &[&str], extra: &str) {
        let script = self.app();
        let mut argv = vec![
            "/usr/bin/python3".to_string(),
            script.display().to_string(),
            "--port".into(),
            port.to_string(),
        ];
        argv.extend(args.iter().map(|s| s.to_string()));
        let argv: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
        let checkpoint = if extra.contains("checkpoint:") {
            ""
        } else {
            "checkpoint:\n  settle: 100ms\n"
        };
        let text = format!(
            "exec: [{}]\nready:\n  http: \"http://127.0.0.1:{port}/health\"\n  timeout: 60s\n{checkpoint}{extra}",
            argv.join(", ")
        );
        self.write_manifest(name, &text);
    }

    /// A tiny HTTP service `name` (answers 200 "ok" on `port`) whose script
    /// first runs `prelude` (Python; its second argument is `arg`), with
    /// `extra` manifest lines.
    #[allow(dead_code)]
    pub fn http_service(&self, name: &str, port: u16, arg: &str, prelude: &str, extra: &str) {
        let script = self.path(&format!("{name}.py"));
        std::fs::write(
            &script,
            format!(
                "import os, socket, sys, time\n\
                 from http.server import BaseHTTPRequestHandler, HTTPServer\n\
                 {prelude}\n\
                 class H(BaseHTTPRequestHandler):\n    \
                     def do_GET(self):\n        \
                         self.send_response(200); self.send_header('Content-Length', '2'); self.end_headers(); self.wfile.write(b'ok')\n    \
                     def log_message(self, *a): pass\n\
                 HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
            ),
        )
        .unwrap();
        self.write_manifest(
            name,
            &format!(
                "exec: [\"/usr/bin/python3\", \"{}\", \"{port}\", \"{arg}\"]\nready: {{http: \"http://127.0.0.1:{port}/\"}}\n{extra}",
                script.display()
            ),
        );
    }

    /// A quick slowweb that never checkpoints, started and ready.
    pub fn start_plain(&self, name: &str) -> (u16, Warmer) {
        let port = free_port();
        self.slowweb(
            name,
            port,
            &["--warmup", "0.2"],
            "checkpoint: {enabled: false}\n",
        );
        let mut w = self.run(name);
        self.wait_ready(name, &mut w);
        (port, w)
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(WARMER);
        c.env("WARMER_MANIFEST_DIR", self.path("manifests"))
            .env("WARMER_CACHE_DIR", self.path("cache"))
            .env("WARMER_RUN_DIR", &self.run)
            .env_remove("NOTIFY_SOCKET");
        c
    }

    pub fn run(&self, name: &str) -> Warmer {
        self.run_with(name, &[])
    }

    /// `warmer run NAME` with extra environment variables.
    pub fn run_with(&self, name: &str, env: &[(&str, &str)]) -> Warmer {
        self.run_with_args(name, &[], env)
    }

    /// `warmer run ARGS... NAME` with extra environment variables.
    #[allow(dead_code)]
    pub fn run_with_args(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> Warmer {
        let child = self
            .command()
            .envs(env.iter().copied())
            .arg("run")
            .args(args)
            .arg(name)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Warmer::from_child(child)
    }

    pub fn status(&self, name: &str) -> serde_json::Value {
        let out = self
            .command()
            .args(["status", name, "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "status failed: {out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0].clone()
    }

    /// Waits until this run of the service is ready (cold or restored).
    pub fn wait_ready(&self, name: &str, w: &mut Warmer) -> serde_json::Value {
        self.wait_status(name, w, |s| {
            s["state"] == "ready" || s["state"] == "checkpointing"
        })
    }

    /// Waits until `status NAME --json` satisfies `want`; on timeout fails
    /// with the last status and warmer's output.
    pub fn wait_status(
        &self,
        name: &str,
        w: &mut Warmer,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            w.assert_running();
            let s = self.status(name);
            if want(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out; last status {s}\nwarmer stderr:\n{}\nstdout:\n{}",
                w.err(),
                w.out()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `name` (a service answering `/state` on `port`) until its image
    /// is published, then stops it; returns the memory nonce it had.
    #[allow(dead_code)]
    pub fn make_image(&self, name: &str, port: u16) -> serde_json::Value {
        let mut w = self.run(name);
        self.wait_image(name, &mut w);
        let nonce = state(port)["nonce"].clone();
        w.stop();
        nonce
    }

    /// Waits until the service's image is published.
    pub fn wait_image(&self, name: &str, w: &mut Warmer) -> serde_json::Value {
        self.wait_status(name, w, |s| {
            !s["image"].is_null() && (s["state"] == "ready" || s["state"] == "checkpointing")
        })
    }

    /// Entry directories currently in the cache.
    pub fn entries(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.path("cache/entries"))
            .map(|r| r.filter_map(|d| d.ok()).map(|d| d.path()).collect())
            .unwrap_or_default()
    }
}

pub struct Warmer {
    pub child: Child,
    pub stdout: Arc<Mutex<String>>,
    pub stderr: Arc<Mutex<String>>,
    /// The threads copying warmer's output; joined once it exits, so its
    /// last lines are in `out()`/`err()`.
    pumps: Vec<std::thread::JoinHandle<()>>,
}

impl Warmer {
    /// Wraps a spawned `warmer` whose stdout/stderr are piped (or null).
    pub fn from_child(mut child: Child) -> Self {
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pumps = Vec::new();
        if let Some(o) = child.stdout.take() {
            pumps.push(pump(Box::new(o), stdout.clone()));
        }
        if let Some(e) = child.stderr.take() {
            pumps.push(pump(Box::new(e), stderr.clone()));
        }
        Self {
            child,
            stdout,
            stderr,
            pumps,
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    pub fn out(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn err(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The run's exit status, if it has ended.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    pub fn assert_running(&mut self) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!(
                "warmer exited early ({st}):\nstdout:\n{}\nstderr:\n{}",
                self.out(),
                self.err()
            );
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// SIGTERM and wait for exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait(Duration::from_secs(30))
    }

    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // EOF comes once warmer and everything that inherited its
                // stdout/stderr are gone.
                for p in self.pumps.drain(..) {
                    let _ = p.join();
                }
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("warmer did not exit within {limit:?}:\n{}", self.err());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Warmer {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An entry's (first) CRIU page image.
pub fn pages_file(entry: &Path) -> PathBuf {
    std::fs::read_dir(entry.join("data"))
        .unwrap()
        .map(|d| d.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pages-")
        })
        .expect("a pages-*.img in the entry")
}

/// The REASON of every quarantined entry.
pub fn quarantine_reasons(env: &Env) -> Vec<String> {
    std::fs::read_dir(env.path("cache/quarantine"))
        .map(|r| {
            r.filter_map(|d| d.ok())
                .map(|d| std::fs::read_to_string(d.path().join("REASON")).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

/// Flips `mask` in the middle byte of an entry's CRIU page image.
pub fn flip_bit_in_pages(entry: &Path, mask: u8) {
    let pages = pages_file(entry);
    let mut bytes = std::fs::read(&pages).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= mask;
    std::fs::write(&pages, bytes).unwrap();
}

pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A plain HTTP GET; the body on 2xx.
pub fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    head.split_whitespace()
        .nth(1)
        .filter(|c| c.starts_with('2'))?;
    Some(body.to_string())
}

pub fn state(port: u16) -> serde_json::Value {
    serde_json::from_str(&get(port, "/state").expect("GET /state")).unwrap()
}

/// PIDs of processes whose command line contains `needle`.
pub fn pids_with(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|d| d.ok())
        .filter_map(|d| d.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

/// Serializes tests that change the host's iptables rules (CRIU's network
/// locks): held until dropped, across test binaries too.
pub fn iptables_lock() -> nix::fcntl::Flock<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/warmer-tests-iptables.lock")
        .unwrap();
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap()
}

/// A fake `criu` for the supervisor's failure branches: no kernel support
/// needed, every outcome on demand. Point `WARMER_CRIU` at it; choose with
/// `FAKE_CRIU_DUMP` (`ok`, `fail`) and `FAKE_CRIU_RESTORE` (`fail`: CRIU
/// error; `exit`: a tree that exits at once; `hang`: a tree that never
/// becomes ready; `slow`: such a tree after 1 s; `stuck`: CRIU never
/// returns; `orphan`: it starts a namespace init of the service
/// (`FAKE_CRIU_INIT`) and never returns). A dump honours `--action-script` as CRIU does (exec with
/// `CRTOOLS_SCRIPT_ACTION=post-dump` and `CRTOOLS_IMAGE_DIR`), so the state
/// capture contract runs for real.
pub fn fake_criu(dir: &Path) -> PathBuf {
    let path = dir.join("fake-criu");
    std::fs::write(
        &path,
        r#"#!/bin/bash
action="$1"; shift
images= work= log= pidfile= script=
while [ $# -gt 0 ]; do
  case "$1" in
    --images-dir) images="$2"; shift ;;
    --work-dir) work="$2"; shift ;;
    --log-file) log="$2"; shift ;;
    --pidfile) pidfile="$2"; shift ;;
    --action-script) script="$2"; shift ;;
  esac
  shift
done
say() { [ -n "$log" ] && echo "$*" >> "$work/$log"; }
case "$action" in
  --version) echo "Version: 4.2.1"; exit 0 ;;
  check) echo "Looks good."; exit 0 ;;
  dump)
    say "(00.000) fake dump"
    if [ "${FAKE_CRIU_DUMP:-ok}" = fail ]; then say "Error (criu/cr-dump.c:1): Dumping FAILED."; exit 1; fi
    echo fake > "$images/core-1.img"
    if [ -n "$script" ]; then
      CRTOOLS_SCRIPT_ACTION=post-dump CRTOOLS_IMAGE_DIR="$images" "$script" || exit 1
    fi
    exit 0 ;;
  lazy-pages)
    case "${FAKE_CRIU_LAZY:-hang}" in
      hang) exec sleep 1002 ;;
      *) echo "fake lazy-pages failed" > "$work/lazy-pages.log"; exit 1 ;;
    esac ;;
  restore)
    say "(00.000) fake restore"
    case "${FAKE_CRIU_RESTORE:-fail}" in
      fail) say "Error (criu/cr-restore.c:1): Restoring FAILED."; exit 1 ;;
      exit) setsid sh -c 'sleep 0.3; exit 3' </dev/null >/dev/null 2>&1 & echo $! > "$pidfile"; exit 0 ;;
      hang) setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $! > "$pidfile"; exit 0 ;;
      slow) sleep 1; setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $! > "$pidfile"; exit 0 ;;
      stuck) exec sleep 1000 ;;
      slowok)
        # A restore that works, slowly: a listener on $FAKE_PORT after 1 s.
        sleep 1
        setsid python3 -c "import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', $FAKE_PORT)); s.listen(); time.sleep(1000)" </dev/null >/dev/null 2>&1 &
        echo $! > "$pidfile"; exit 0 ;;
      orphan)
        # A namespace init of this service, as a real restore would leave it,
        # then CRIU itself never returns.
        # (sleep 1001: the test cleans these up by name, and only these.)
        setsid "$FAKE_CRIU_INIT" "$(basename "$work")" "$work" -- sleep 1001 </dev/null >/dev/null 2>&1 &
        exec sleep 1001 ;;
    esac ;;
esac
echo "fake criu: unsupported: $action" >&2
exit 2
"#,
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Copies a child's output into `to` until EOF.
fn pump(mut from: Box<dyn Read + Send>, to: Arc<Mutex<String>>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            to.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
}

/// A PostgreSQL 15 cluster of a test's own, dropped (and stopped) at the end.
#[allow(dead_code)]
pub struct Cluster {
    pub name: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pg_dropcluster")
            .args(["--stop", "15", &self.name])
            .output();
    }
}

/// `psql` as postgres over the unix socket in /var/run/postgresql.
pub fn psql(port: u16, sql: &str) -> String {
    let out = Command::new("runuser")
        .args([
            "-u",
            "postgres",
            "--",
            "psql",
            "-h",
            "/var/run/postgresql",
            "-p",
        ])
        .arg(port.to_string())
        .args(["-XAtc", sql])
        .output()
        .unwrap();
    assert!(out.status.success(), "psql {sql}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A sandboxed service with memory enough for `auto` to restore it lazily:
/// its credentials, its memory (hashed from inside, every page read) and
/// what it holds open, reported from inside.
pub const MEMORY_SERVICE: &str = r#"
import hashlib, http.server, json, os, sys
port = int(sys.argv[1])
blob = bytearray(os.urandom(96 << 20))
first = hashlib.sha256(blob).hexdigest()
def fds():
    out = []
    for f in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink("/proc/self/fd/" + f))
        except OSError:
            pass
    return sorted(out)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        status = {}
        for l in open("/proc/self/status"):
            k, _, v = l.partition(":")
            if k in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd",
                     "CapAmb", "NoNewPrivs", "Seccomp"):
                status[k] = v.strip()
        body = json.dumps({"status": status, "first": first,
                           "now": hashlib.sha256(blob).hexdigest(), "fds": fds()}).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"#;

/// A directory removed when dropped.
pub struct Removed(pub PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fails, saying why, unless `warmer check` prints `says` (a property of
/// the CRIU warmer runs that `what` names).
fn require_check_says(says: &str, what: &str) {
    let check = Command::new(WARMER).arg("check").output().unwrap();
    let said = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(
        said.contains(says),
        "the CRIU warmer runs {what}; run the README's test command (scripts/install-criu.sh builds one that can, and scripts/test.sh sets WARMER_CRIU to it):\n{said}"
    );
}

/// Fails unless the CRIU warmer runs can give a sandbox's user namespace a
/// userfaultfd.
pub fn require_lazy_in_userns() {
    require_check_says(
        "sandboxed services: lazy restores",
        "cannot give a sandbox a userfaultfd",
    );
}

/// Fails unless the CRIU warmer runs holds a lazy restore's background
/// transfer until the service is quiet.
pub fn require_quiet_background() {
    require_check_says("follows once the service is quiet", "has no --lazy-bg-idle");
}

/// `MEMORY_SERVICE` as service `name` of `env`, as `nobody` in a sandbox
/// (a private /tmp, `protect_system: strict`, no new privileges), `extra`
/// appended to its manifest; its port. The script and `env`'s run
/// directory move outside /tmp (the service's own /tmp hides the host's)
/// into the directories returned, removed when dropped.
pub fn sandboxed_memory_service(env: &mut Env, name: &str, extra: &str) -> (u16, [Removed; 2]) {
    let tag = format!("{}-{name}-{}", std::process::id(), free_port());
    let run = Removed(PathBuf::from(format!("/run/warmer-run-{tag}")));
    std::fs::create_dir_all(&run.0).unwrap();
    env.run = run.0.clone();
    let srv = Removed(PathBuf::from(format!("/srv/warmer-{tag}")));
    std::fs::create_dir_all(&srv.0).unwrap();
    let open = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(&srv.0, open).unwrap();
    let script = srv.0.join("memory.py");
    std::fs::write(&script, MEMORY_SERVICE).unwrap();
    let port = free_port();
    env.write_manifest(
        name,
        &format!(
            "exec: [\"/usr/bin/python3\", \"{script}\", \"{port}\"]\n\
             user: nobody\n\
             ready: {{http: \"http://127.0.0.1:{port}/\", timeout: 30s}}\n\
             checkpoint: {{settle: 100ms}}\n\
             sandbox:\n\
             \x20 private_tmp: true\n\
             \x20 protect_system: strict\n\
             \x20 no_new_privileges: true\n{extra}",
            script = script.display(),
        ),
    );
    (port, [run, srv])
}

/// What `MEMORY_SERVICE` on `port` reports, checked: its memory hashes as
/// it did at its start (every page read), and it holds no userfaultfd.
pub fn memory_report(port: u16) -> serde_json::Value {
    let r: serde_json::Value = serde_json::from_str(&get(port, "/").expect("it answers")).unwrap();
    assert_eq!(r["now"], r["first"], "every page of its memory: {r}");
    assert!(
        !r["fds"].to_string().contains("userfaultfd"),
        "the service holds no userfaultfd: {r}"
    );
    r
}
