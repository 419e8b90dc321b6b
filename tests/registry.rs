//! Images that travel: a real OCI registry (Debian's `docker-registry`, on a
//! free local port with its own storage), real CRIU, real processes. A
//! second "node" is a second warmer installation: its own manifests and
//! cache, the same run directory path (as every machine's /run/warmer).

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A `docker-registry serve` of our own; killed on drop.
struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Registry {
    /// `users`: htpasswd auth with these (user, password) pairs.
    fn start(users: &[(&str, &str)]) -> Self {
        Self::start_on(free_port(), users)
    }

    fn start_on(port: u16, users: &[(&str, &str)]) -> Self {
        let bin = ["/usr/bin/docker-registry", "/usr/bin/registry"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("no docker-registry: scripts/deps.sh installs Debian's docker-registry");
        let dir = tempfile::Builder::new()
            .prefix("warmer-registry-")
            .tempdir()
            .unwrap();
        let mut auth = String::new();
        if !users.is_empty() {
            let mut lines = String::new();
            for (u, p) in users {
                let out = Command::new("python3")
                    .args([
                        "-W",
                        "ignore",
                        "-c",
                        "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
                        p,
                    ])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "bcrypt: {out:?}");
                lines.push_str(&format!("{u}:{}", String::from_utf8_lossy(&out.stdout)));
            }
            std::fs::write(dir.path().join("htpasswd"), lines).unwrap();
            auth = format!(
                "auth:\n  htpasswd:\n    realm: warmer-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            );
        }
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let r = Registry { child, port, dir };
        wait_for(Duration::from_secs(20), || {
            let s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            drop(s);
            Some(())
        });
        r
    }

    fn repository(&self, name: &str) -> String {
        format!("127.0.0.1:{}/warmer/{name}", self.port)
    }

    /// The tags of a repository, as the registry lists them (no auth).
    fn tags(&self, name: &str) -> String {
        get(self.port, &format!("/v2/warmer/{name}/tags/list")).unwrap_or_default()
    }

    /// The biggest blob the registry stores (an image's pages).
    fn biggest_blob(&self) -> PathBuf {
        let mut best: Option<(u64, PathBuf)> = None;
        let root = self.dir.path().join("data/docker/registry/v2/blobs/sha256");
        for a in std::fs::read_dir(&root).unwrap() {
            for b in std::fs::read_dir(a.unwrap().path()).unwrap() {
                let data = b.unwrap().path().join("data");
                let len = std::fs::metadata(&data).map(|m| m.len()).unwrap_or(0);
                if best.as_ref().is_none_or(|(l, _)| len > *l) {
                    best = Some((len, data));
                }
            }
        }
        best.unwrap().1
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node with a small slowweb whose images go to `reg`.
fn node_with_remote(reg: &Registry) -> Env {
    let a = Env::new();
    a.slowweb(
        "web",
        free_port(),
        &["--warmup", "0.3"],
        &remote(&reg.repository("web"), ""),
    );
    a
}

fn remote(repo: &str, extra: &str) -> String {
    let (key, public) = keys();
    format!(
        "remote:\n  repository: {repo}\n  insecure: true\n  sign: {}\n  verify: [{}]\n{extra}",
        key.display(),
        public.display()
    )
}

/// The key pair every node of these tests signs with and trusts, made once
/// with `warmer keygen` in a private directory.
fn keys() -> &'static (PathBuf, PathBuf) {
    static KEYS: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| keygen("node"))
}

/// A new key pair named `name`, in a directory of its own.
fn keygen(name: &str) -> (PathBuf, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("warmer-keys-")
        .tempdir()
        .unwrap()
        .keep();
    let prefix = dir.join(name);
    let out = Command::new(env!("CARGO_BIN_EXE_warmer"))
        .arg("keygen")
        .arg(&prefix)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.pub")),
    )
}

fn warmer(env: &Env, args: &[&str], extra_env: &[(&str, &str)]) -> std::process::Output {
    env.command()
        .args(args)
        .envs(extra_env.iter().copied())
        .output()
        .unwrap()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Node A: cold start, checkpoint; returns the service's nonce (its
/// in-memory state) and stops it.
fn make_image(env: &Env, name: &str) -> String {
    let mut w = env.run(name);
    env.wait_image(name, &mut w);
    let port = port_of(env, name);
    let nonce = state(port)["nonce"].as_str().unwrap().to_string();
    w.stop();
    nonce
}

fn port_of(env: &Env, name: &str) -> u16 {
    let m = std::fs::read_to_string(env.path("manifests").join(format!("{name}.yaml"))).unwrap();
    let at = m.find("127.0.0.1:").unwrap() + "127.0.0.1:".len();
    m[at..].split('/').next().unwrap().parse().unwrap()
}

/// Node B starts the service and must restore node A's memory.
fn assert_restores_nonce(env: &Env, name: &str, nonce: &str) -> String {
    let mut w = env.run(name);
    let s = env.wait_ready(name, &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    assert_eq!(state(port_of(env, name))["nonce"], nonce, "node A's memory");
    w.stop();
    w.err()
}

#[test]
fn a_fresh_node_restores_the_image_another_node_pushed() {
    require_criu();
    let reg = Registry::start(&[]);
    let a = Env::new();
    let port = free_port();
    a.slowweb(
        "web",
        port,
        &["--warmup", "0.5"],
        &remote(&reg.repository("web"), "  push: true\n"),
    );
    // Push happens in the background after the checkpoint; wait for the tag.
    let mut w = a.run("web");
    let s = a.wait_image("web", &mut w);
    let digest = s["image"]["digest"].as_str().unwrap().to_string();
    let nonce = state(port)["nonce"].as_str().unwrap().to_string();
    // The tag is the push's last step; its log line comes just after.
    wait_for(Duration::from_secs(60), || {
        (reg.tags("web").contains(&digest) && w.err().contains("pushed image")).then_some(())
    });
    w.stop();

    // Node B: empty cache, only the manifest. It restores before the pull
    // ends (the image's small files and first frames, the rest served from
    // the registry and fetched behind it), and keeps the whole image once it
    // has arrived (before its run ends).
    let b = Env::node_like(&a);
    let err = assert_restores_nonce(&b, "web", &nonce);
    assert!(err.contains("restoring before the pull ends"), "{err}");
    // What the restore read first came as one blob, not as frames.
    assert!(
        err.contains("ranges of first pages") && !err.contains("and 0 ranges"),
        "{err}"
    );
    assert!(
        err.contains("the rest of image") && err.contains("kept as"),
        "{err}"
    );
    let ls = warmer(&b, &["cache", "ls", "--json"], &[]);
    let rows: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    let origin = rows[0]["origin"].as_str().unwrap_or("");
    assert!(origin.contains(&reg.repository("web")), "{rows}");
    assert!(rows[0]["verified_this_boot"].as_bool().unwrap(), "{rows}");

    // A push of the same image from B sends no image file again: only
    // what B's restore learned (its working set, and the pages a restore
    // reads first, which follow from it: two small layers of their own).
    let again = warmer(&b, &["push", "web", "--json"], &[]);
    assert!(again.status.success(), "{}", text(&again));
    let p: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    let (blobs, present) = (
        p["blobs"].as_u64().unwrap(),
        p["blobs_present"].as_u64().unwrap(),
    );
    assert!(blobs - present <= 2, "{p}");
    assert!(
        p["sent_bytes"].as_u64().unwrap() * 4 < p["wire_bytes"].as_u64().unwrap(),
        "{p}"
    );
    // And once more: nothing new at all.
    let third = warmer(&b, &["push", "web", "--json"], &[]);
    let p: serde_json::Value = serde_json::from_slice(&third.stdout).unwrap();
    assert_eq!(p["sent_bytes"], 0, "{p}");
    assert_eq!(p["blobs_present"], p["blobs"], "{p}");

    // The image's small files travel as one blob (one request for a node
    // that pulls it), a plain tar; page files are layers of their own.
    let m: serde_json::Value = serde_json::from_str(&get_accept(
        reg.port,
        &format!("/v2/warmer/web/manifests/{digest}"),
        "application/vnd.oci.image.manifest.v1+json",
    ))
    .unwrap();
    let layers = m["layers"].as_array().unwrap();
    let bundle: Vec<&serde_json::Value> = layers
        .iter()
        .filter(|l| l["mediaType"] == "application/vnd.warmer.image.bundle.v1+tar+zstd")
        .collect();
    assert_eq!(bundle.len(), 1, "{m}");
    let blob = get_bytes(
        reg.port,
        &format!(
            "/v2/warmer/web/blobs/{}",
            bundle[0]["digest"].as_str().unwrap()
        ),
    );
    let mut tar = tar::Archive::new(zstd::stream::Decoder::new(&blob[..]).unwrap());
    let names: Vec<String> = tar
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    for name in ["pstree.img", "inventory.img", "restore.json"] {
        assert!(names.iter().any(|n| n == name), "{name} not in {names:?}");
    }
    assert!(!names.iter().any(|n| n.starts_with("pages-")), "{names:?}");
    for l in layers {
        let title = l["annotations"]["org.opencontainers.image.title"]
            .as_str()
            .unwrap_or("");
        assert!(!names.iter().any(|n| n == title), "{title} twice: {m}");
    }
}

#[test]
fn a_working_set_learned_on_one_node_travels_with_its_push() {
    require_criu();
    let reg = Registry::start(&[]);
    let a = Env::new();
    // Memory enough for auto to go lazy (and so to learn).
    a.slowweb(
        "web",
        free_port(),
        &["--records", "700000"],
        &remote(&reg.repository("web"), ""),
    );
    let nonce = make_image(&a, "web");
    assert_restores_nonce(&a, "web", &nonce);
    let pushed = warmer(&a, &["push", "web"], &[]);
    assert!(pushed.status.success(), "{}", text(&pushed));

    let b = Env::node_like(&a);
    // Node B restores it first, before the pull ends (the working set came
    // with the image's first layers), and keeps it with the image.
    let err = assert_restores_nonce(&b, "web", &nonce);
    assert!(err.contains("restoring before the pull ends"), "{err}");
    assert!(
        err.contains("working set first (before the pull ends: its working set first"),
        "{err}"
    );
    let note = std::fs::read_dir(b.path("cache/notes"))
        .unwrap()
        .filter_map(|d| d.ok())
        .next()
        .unwrap()
        .path()
        .join("working-set");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&note).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "private like the image");
}

#[test]
fn an_image_whose_push_failed_travels_after_a_later_start() {
    require_criu();
    let port = free_port();
    let a = Env::new();
    a.slowweb(
        "web",
        free_port(),
        &["--warmup", "0.3"],
        &remote(&format!("127.0.0.1:{port}/warmer/web"), "  push: true\n"),
    );
    // The registry is not up yet: the push after the checkpoint fails.
    let mut w = a.run("web");
    let s = a.wait_image("web", &mut w);
    let digest = s["image"]["digest"].as_str().unwrap().to_string();
    wait_for(Duration::from_secs(30), || {
        w.err().contains("cannot push image").then_some(())
    });
    w.stop();
    // Up now: the next start restores the local image and, in the
    // background, pushes it since the registry lacks it.
    let reg = Registry::start_on(port, &[]);
    let mut w = a.run("web");
    let s = a.wait_ready("web", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}");
    wait_for(Duration::from_secs(60), || {
        reg.tags("web").contains(&digest).then_some(())
    });
    // The tag is visible as soon as the registry has the manifest; warmer
    // says so a moment later.
    wait_for(Duration::from_secs(10), || {
        w.err().contains("pushed image").then_some(())
    });
    w.stop();
}

#[test]
fn a_registry_that_is_down_or_silent_costs_a_start_at_most_its_timeout() {
    require_criu();
    // Nothing listens: refused at once.
    let env = Env::new();
    let dead = free_port();
    let port = free_port();
    env.slowweb(
        "down",
        port,
        &["--warmup", "0.2"],
        &format!(
            "checkpoint: {{enabled: false}}\n{}",
            remote(&format!("127.0.0.1:{dead}/warmer/down"), "")
        ),
    );
    let mut w = env.run("down");
    let s = env.wait_ready("down", &mut w);
    assert_eq!(s["last_start"], "cold", "{s}");
    w.stop();
    assert!(w.err().contains("no image from"), "{}", w.err());

    // Accepts connections, never answers: bounded by remote.timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let port = free_port();
    env.slowweb(
        "silent",
        port,
        &["--warmup", "0.2"],
        &format!(
            "checkpoint: {{enabled: false}}\n{}",
            remote(
                &format!("127.0.0.1:{silent_port}/warmer/silent"),
                "  timeout: 1s\n"
            )
        ),
    );
    let t = Instant::now();
    let mut w = env.run("silent");
    let s = env.wait_ready("silent", &mut w);
    let took = t.elapsed();
    assert_eq!(s["last_start"], "cold", "{s}");
    w.stop();
    assert!(w.err().contains("no answer within 1s"), "{}", w.err());
    assert!(
        took < Duration::from_secs(6),
        "a silent registry delayed the start by {took:?}"
    );
    drop(silent);
}

/// Nothing in `env`'s cache came from a registry (a cold start's own image
/// may be there).
fn assert_nothing_pulled(env: &Env) {
    let ls = warmer(env, &["cache", "ls", "--json"], &[]);
    let rows: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .all(|r| r["origin"].as_str().is_none()),
        "{rows}"
    );
}

/// A node that made the image of "web" and pushed it to `reg`.
fn node_that_pushed(reg: &Registry) -> Env {
    let a = node_with_remote(reg);
    make_image(&a, "web");
    let pushed = warmer(&a, &["push", "web"], &[]);
    assert!(pushed.status.success(), "{}", text(&pushed));
    a
}

/// Shared memory's pages are never served lazily: CRIU reads them whole
/// before the tree runs, so a fresh node fetches all of them first (a sparse
/// hole read as zeros would be memory that is not the service's).
#[test]
fn shared_memory_comes_back_whole_on_a_fresh_node() {
    require_criu();
    let reg = Registry::start(&[]);
    let a = Env::new();
    let port = free_port();
    const MIB: usize = 1 << 20;
    a.http_service(
        "web",
        port,
        "x",
        "import mmap\nSHM = mmap.mmap(-1, 8 << 20)\nSHM.write(bytes(i % 251 for i in range(8 << 20)))",
        &format!(
            "checkpoint:\n  settle: 100ms\n{}",
            remote(&reg.repository("web"), "")
        ),
    );
    let mut w = a.run("web");
    a.wait_image("web", &mut w);
    w.stop();
    let pushed = warmer(&a, &["push", "web"], &[]);
    assert!(pushed.status.success(), "{}", text(&pushed));

    let b = Env::node_like(&a);
    let mut w = b.run("web");
    let s = b.wait_ready("web", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    assert!(
        w.err().contains("restoring before the pull ends"),
        "{}",
        w.err()
    );
    // The shared mapping, read from outside: every byte as it was.
    let pid = s["pid"].as_i64().unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let start = maps
        .lines()
        .find_map(|l| {
            let (range, rest) = l.split_once(' ')?;
            let (a, b) = range.split_once('-')?;
            let (a, b) = (
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            );
            (rest.contains("/dev/zero") && b - a == 8 * MIB as u64).then_some(a)
        })
        .unwrap_or_else(|| panic!("no 8 MiB shared mapping:\n{maps}"));
    let mut got = vec![0u8; 8 * MIB];
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&mem, &mut got, start).unwrap();
    let bad = (0..8 * MIB).find(|&i| got[i] != u8::try_from(i % 251).unwrap());
    assert_eq!(bad, None, "shared memory differs from the image");
    w.stop();
}

/// A sandboxed service's image, pushed by one node, restores on a fresh
/// node before its pull ends: lazily, in its own user namespace, the pages
/// served from the registry; its credentials and every page of its memory
/// as they were.
#[test]
fn a_sandboxed_service_restores_on_a_fresh_node_before_its_pull_ends() {
    require_criu();
    require_lazy_in_userns();
    let reg = Registry::start(&[]);
    let mut a = Env::new();
    let extra = remote(&reg.repository("box"), "");
    let (port, _dirs) = sandboxed_memory_service(&mut a, "box", &extra);
    let mut w = a.run("box");
    a.wait_image("box", &mut w);
    let cold = memory_report(port);
    w.stop();
    let pushed = warmer(&a, &["push", "box"], &[]);
    assert!(pushed.status.success(), "{}", text(&pushed));

    let b = Env::node_like(&a);
    let mut w = b.run("box");
    let s = b.wait_ready("box", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    assert!(
        w.err().contains("restoring before the pull ends"),
        "{}",
        w.err()
    );
    let restored = memory_report(port);
    assert_eq!(restored["status"], cold["status"], "the same credentials");
    assert_eq!(restored["first"], cold["first"], "node A's memory");
    w.stop();
}

/// Waits until the run is ready after a cold start (`true`) or has ended
/// (`false`: its restored service was killed).
fn cold_or_ended(env: &Env, w: &mut Warmer) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if w.try_wait().is_some() {
            return false;
        }
        let s = env.status("web");
        if s["state"] == "ready" && s["last_start"] == "cold" {
            return true;
        }
        assert!(std::time::Instant::now() < deadline, "{s}\n{}", w.err());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A registry lost once a restore from it has begun: the pages it can no
/// longer serve are never served as anything else. The tree is killed
/// before the lazy-pages daemon is answered; the service then starts cold
/// (or, already ready, ends: its unit starts it again), never running on
/// memory that is not its own. (The loss is a failpoint: every frame
/// fetched after the restore began fails, as when the registry is gone.)
#[test]
fn a_registry_lost_mid_restore_never_leaves_the_service_on_missing_pages() {
    require_criu();
    let reg = Registry::start(&[]);
    let a = node_that_pushed(&reg);

    let b = Env::node_like(&a);
    let mut w = b.run_with("web", &[("WARMER_FAILPOINT", "stream-frame-after-restore")]);
    let outcome = if cold_or_ended(&b, &mut w) {
        "cold".to_string()
    } else {
        "warmer exited".to_string()
    };
    let err = w.err();
    assert!(
        err.contains("restoring before the pull ends"),
        "{outcome}\n{err}"
    );
    assert!(
        err.contains("the image's pages cannot be had") && err.contains("failpoint"),
        "{outcome}\n{err}"
    );
    if outcome == "cold" {
        // The restore failed; nothing of it runs beside the cold service.
        assert!(
            err.contains("restore failed") || err.contains("cold start"),
            "{err}"
        );
        // Lost while CRIU still ran: CRIU is stopped then, not left waiting
        // on the pages until its deadline (a minute, once).
        assert!(!err.contains("did not finish within"), "{err}");
        w.stop();
    } else {
        // Ready, then killed: the run ends with the service.
        assert!(err.contains("killed"), "{outcome}\n{err}");
    }
    // The registry's image was not kept (a cold start may have made B's
    // own), and the next start does not stream it again.
    assert_nothing_pulled(&b);
    let history = std::fs::read_to_string(b.run.join("web/restore-history.json"))
        .unwrap_or_else(|e| panic!("{e}: {outcome}\n{err}"));
    assert!(history.contains("cannot be had"), "{history}");
}

#[test]
fn a_tampered_blob_is_refused_and_the_service_starts_cold() {
    require_criu();
    let reg = Registry::start(&[]);
    let a = node_that_pushed(&reg);

    // Same size, one byte changed in the middle (a frame that is
    // decompressed while it downloads): only a digest check can tell.
    let blob = reg.biggest_blob();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&blob)
        .unwrap();
    use std::io::Seek;
    let middle = f.metadata().unwrap().len() / 2;
    let mut byte = [0u8; 1];
    f.seek(std::io::SeekFrom::Start(middle)).unwrap();
    f.read_exact(&mut byte).unwrap();
    f.seek(std::io::SeekFrom::Start(middle)).unwrap();
    f.write_all(&[byte[0] ^ 0xff]).unwrap();
    drop(f);

    let b = Env::node_like(&a);
    let pull = warmer(&b, &["pull", "web"], &[]);
    assert!(!pull.status.success(), "{}", text(&pull));
    assert!(text(&pull).contains("tampered"), "{}", text(&pull));
    assert!(b.entries().is_empty(), "nothing tampered enters the cache");

    // A start restores before the pull ends: every frame is checked
    // against the signed frame index before it is used, so the tampered
    // one is refused when it is reached. Before the service is ready: it
    // starts cold. After: it is killed before that frame's pages are
    // served, and the next start pulls the image whole, which the blob's
    // digest refuses: cold.
    let mut w = b.run("web");
    let cold = cold_or_ended(&b, &mut w);
    assert!(w.err().contains("tampered"), "{}", w.err());
    if cold {
        w.stop();
    } else {
        assert!(
            w.err().contains("the image's pages cannot be had"),
            "{}",
            w.err()
        );
        let mut again = b.run("web");
        let s = b.wait_ready("web", &mut again);
        assert_eq!(s["last_start"], "cold", "{s}");
        again.stop();
        assert!(again.err().contains("tampered"), "{}", again.err());
    }
    // Nothing of the registry's image entered the cache (a cold start's own
    // image may have).
    assert_nothing_pulled(&b);
}

#[test]
fn a_registry_with_auth_works_with_the_auth_file_and_fails_clearly_without() {
    require_criu();
    let reg = Registry::start(&[("ci", "s3cret")]);
    let a = node_with_remote(&reg);
    let nonce = make_image(&a, "web");
    let no_file = a.path("none.json");
    let denied = warmer(
        &a,
        &["push", "web"],
        &[("REGISTRY_AUTH_FILE", no_file.to_str().unwrap())],
    );
    assert!(!denied.status.success(), "{}", text(&denied));
    let msg = text(&denied).to_lowercase();
    assert!(
        msg.contains("401") || msg.contains("unauthorized") || msg.contains("authentication"),
        "{msg}"
    );

    let auth = a.path("auth.json");
    std::fs::write(
        &auth,
        format!(
            r#"{{"auths": {{"127.0.0.1:{}": {{"auth": "Y2k6czNjcmV0"}}}}}}"#,
            reg.port
        ),
    )
    .unwrap();
    let auth_env = [("REGISTRY_AUTH_FILE", auth.to_str().unwrap())];
    // Passwords others can read are refused, as ssh refuses such keys.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = warmer(&a, &["push", "web"], &auth_env);
    assert!(
        !refused.status.success() && text(&refused).contains("readable by others"),
        "{}",
        text(&refused)
    );
    std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o600)).unwrap();
    let pushed = warmer(&a, &["push", "web"], &auth_env);
    assert!(pushed.status.success(), "{}", text(&pushed));

    let b = Env::node_like(&a);
    let pulled = warmer(&b, &["pull", "web"], &auth_env);
    assert!(pulled.status.success(), "{}", text(&pulled));
    assert_restores_nonce(&b, "web", &nonce);
}

#[test]
fn export_and_import_carry_an_image_and_refuse_another_host() {
    require_criu();
    let a = Env::new();
    a.slowweb("web", free_port(), &["--warmup", "0.3"], "");
    let nonce = make_image(&a, "web");
    // Keys for every service, from the trust file (no `remote:` here).
    let (key, public) = keys();
    let trust = key.with_file_name("trust.yaml");
    if !trust.exists() {
        std::fs::write(
            &trust,
            format!("sign: {}\nverify: [{}]\n", key.display(), public.display()),
        )
        .unwrap();
    }
    let trusted = [("WARMER_TRUST_FILE", trust.to_str().unwrap())];
    let nobody = [("WARMER_TRUST_FILE", "/nonexistent")];
    // Without a key the archive carries no signature: refused on import.
    let unsigned = a.path("unsigned.tar");
    let out = warmer(
        &a,
        &["export", "web", "-o", unsigned.to_str().unwrap()],
        &nobody,
    );
    assert!(out.status.success(), "{}", text(&out));
    let b = Env::node_like(&a);
    let refused = warmer(&b, &["import", unsigned.to_str().unwrap()], &trusted);
    assert!(
        !refused.status.success()
            && text(&refused).contains("image refused: the image is not signed"),
        "{}",
        text(&refused)
    );
    assert!(b.entries().is_empty(), "nothing of it entered the cache");

    let archive = a.path("web.tar");
    let out = warmer(
        &a,
        &["export", "web", "-o", archive.to_str().unwrap()],
        &trusted,
    );
    assert!(out.status.success(), "{}", text(&out));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&archive).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "an image holds secrets");

    let imported = warmer(&b, &["import", archive.to_str().unwrap()], &trusted);
    assert!(imported.status.success(), "{}", text(&imported));
    assert!(
        text(&imported).contains("the next start of web restores it"),
        "{}",
        text(&imported)
    );

    // What the imported image holds, from its files alone.
    let out = warmer(&b, &["inspect", "web", "--json"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let i: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(i["origin"].as_str().unwrap().starts_with("import "), "{i}");
    assert_eq!(i["taken"], "ready", "{i}");
    let port = port_of(&b, "web");
    let service = i["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["cmdline"][0] == "/usr/bin/python3")
        .unwrap_or_else(|| panic!("no service process with its command line: {i}"));
    assert!(
        service["cmdline"].to_string().contains(&port.to_string()),
        "{service}"
    );
    assert!(
        service["image_bytes"].as_u64().unwrap() > 1_000_000,
        "{service}"
    );
    assert!(
        i["sockets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["state"] == "listen"
                && s["local"].as_str().unwrap().ends_with(&format!(":{port}"))),
        "{i}"
    );
    assert!(
        i["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "pid"),
        "{i}"
    );
    let table = warmer(&b, &["inspect", "web"], &[]);
    assert!(text(&table).contains("SOCKETS"), "{}", text(&table));

    assert_restores_nonce(&b, "web", &nonce);

    // The same image as if made on a host with another kernel.
    let other = a.path("other.tar");
    rewrite_host(&archive, &other, "kernel", "5.10.0-other");
    let c = Env::new();
    let refused = warmer(&c, &["import", other.to_str().unwrap()], &trusted);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("kernel: image 5.10.0-other, here"),
        "{}",
        text(&refused)
    );
    assert!(c.entries().is_empty());

    // A damaged archive: one byte of a blob changed.
    let damaged = a.path("damaged.tar");
    let mut bytes = std::fs::read(&archive).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&damaged, bytes).unwrap();
    let bad = warmer(&c, &["import", damaged.to_str().unwrap()], &trusted);
    assert!(!bad.status.success(), "{}", text(&bad));
    assert!(c.entries().is_empty());
}

/// Rewrites an exported archive's config host fact `key` (and every digest
/// that depends on it), as a host with that fact would have made it.
fn rewrite_host(src: &Path, dst: &Path, key: &str, value: &str) {
    use sha2::{Digest, Sha256};
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut ar = tar::Archive::new(std::fs::File::open(src).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        files.push((name, data));
    }
    let sha = |d: &[u8]| hex::encode(Sha256::digest(d));
    let find = |files: &[(String, Vec<u8>)], name: &str| {
        files.iter().position(|(n, _)| n == name).unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&files[find(&files, "index.json")].1).unwrap();
    let mdig = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let mi = find(&files, &format!("blobs/sha256/{mdig}"));
    let mut manifest: serde_json::Value = serde_json::from_slice(&files[mi].1).unwrap();
    let cdig = manifest["config"]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let ci = find(&files, &format!("blobs/sha256/{cdig}"));
    let mut config: serde_json::Value = serde_json::from_slice(&files[ci].1).unwrap();
    config["entry"]["host"][key] = value.into();
    let config = serde_json::to_vec(&config).unwrap();
    manifest["config"]["digest"] = format!("sha256:{}", sha(&config)).into();
    manifest["config"]["size"] = config.len().into();
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    let mut index = index;
    index["manifests"][0]["digest"] = format!("sha256:{}", sha(&manifest_bytes)).into();
    index["manifests"][0]["size"] = manifest_bytes.len().into();
    files[ci] = (format!("blobs/sha256/{}", sha(&config)), config);
    files[mi] = (
        format!("blobs/sha256/{}", sha(&manifest_bytes)),
        manifest_bytes,
    );
    // Signed again (with the trusted key: this tests the host check, which
    // only a signed image reaches).
    let new_digest = format!("sha256:{}", sha(&files[mi].1));
    let signer = warmer::remote::sign::Signer::load(&keys().0).unwrap();
    let sig = warmer::remote::sign::Artifact::new(&signer, "warmer/web", &new_digest).unwrap();
    for bytes in [&sig.manifest, &sig.config, &sig.payload] {
        files.push((format!("blobs/sha256/{}", sha(bytes)), bytes.to_vec()));
    }
    index["manifests"][1] = serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": format!("sha256:{}", sha(&sig.manifest)),
        "size": sig.manifest.len(),
        "annotations": {
            "org.opencontainers.image.ref.name": warmer::remote::sign::signature_tag(&new_digest)
        },
    });
    let ii = find(&files, "index.json");
    files[ii].1 = serde_json::to_vec(&index).unwrap();
    let mut out = tar::Builder::new(std::fs::File::create(dst).unwrap());
    for (name, data) in &files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        out.append_data(&mut h, name, &data[..]).unwrap();
    }
    out.finish().unwrap();
}

#[test]
fn a_pull_that_broke_off_resumes_and_a_bad_partial_is_refused_then_refetched() {
    require_criu();
    let reg = Registry::start(&[]);
    let a = node_with_remote(&reg);
    let nonce = make_image(&a, "web");
    let pushed = warmer(&a, &["push", "web", "--json"], &[]);
    assert!(pushed.status.success(), "{}", text(&pushed));
    let digest = a.status("web")["digest"].as_str().unwrap().to_string();

    // Node B broke off half-way through the biggest blob.
    let blob = reg.biggest_blob();
    let hex = blob
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let bytes = std::fs::read(&blob).unwrap();
    let half = bytes.len() / 2;
    let b = Env::node_like(&a);
    let seed = |data: &[u8]| {
        // `warmer pull` makes the cache; the download directory is its own.
        let dir = b.path("cache/incoming").join(&digest);
        std::fs::create_dir_all(&dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(dir.join(format!("{hex}.part")), data).unwrap();
    };
    let total = |out: &std::process::Output| -> u64 {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["Pulled"]["fetched_bytes"].as_u64().unwrap()
    };
    // A partial that is not the blob's beginning: the whole blob fails its
    // digest, is refused and dropped; the next pull fetches it whole.
    warmer(&b, &["cache", "ls"], &[]);
    let mut garbage = bytes[..half].to_vec();
    garbage[0] ^= 0xff;
    seed(&garbage);
    let bad = warmer(&b, &["pull", "web", "--json"], &[]);
    assert!(!bad.status.success(), "{}", text(&bad));
    assert!(text(&bad).contains("tampered"), "{}", text(&bad));
    assert!(b.entries().is_empty());

    seed(&bytes[..half]);
    let resumed = warmer(&b, &["pull", "web", "--json"], &[]);
    assert!(resumed.status.success(), "{}", text(&resumed));
    // What a whole pull fetches: every blob but those only a restore that
    // begins before the pull ends reads (the frame index, the first pages).
    let wire: u64 = {
        let m: serde_json::Value = serde_json::from_str(&get_accept(
            reg.port,
            &format!("/v2/warmer/web/manifests/{digest}"),
            "application/vnd.oci.image.manifest.v1+json",
        ))
        .unwrap();
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| {
                l["mediaType"] != "application/vnd.warmer.frames.v1+json"
                    && l["mediaType"] != "application/vnd.warmer.first-pages.v1+zstd"
            })
            .map(|l| l["size"].as_u64().unwrap())
            .sum::<u64>()
            + m["config"]["size"].as_u64().unwrap()
    };
    let fetched = total(&resumed);
    assert!(
        fetched < wire && fetched + half as u64 >= wire - (64 << 10),
        "resumed: fetched {fetched} of {wire} with {half} already here"
    );
    assert!(
        !b.path("cache/incoming").join(&digest).exists(),
        "downloads are removed once the entry is in the cache"
    );
    assert_restores_nonce(&b, "web", &nonce);
}

/// A forged image: whoever can push to the repository serves an image that
/// is self-consistent (its config lists its files' hashes) but not signed
/// by a key the node trusts. It is refused before anything of it is used,
/// and the service starts cold, saying why.
#[test]
fn a_forged_image_in_the_registry_is_refused_and_the_service_starts_cold() {
    require_criu();
    let reg = Registry::start(&[]);
    // The attacker's node: the same service and program (so the same
    // digest), its own key, pushing to the same repository.
    let (evil_key, evil_pub) = keygen("attacker");
    let attacker = Env::new();
    let port = free_port();
    attacker.slowweb(
        "web",
        port,
        &["--warmup", "0.3"],
        &format!(
            "remote:\n  repository: {}\n  insecure: true\n  sign: {}\n  verify: [{}]\n",
            reg.repository("web"),
            evil_key.display(),
            evil_pub.display()
        ),
    );
    make_image(&attacker, "web");
    let pushed = warmer(&attacker, &["push", "web"], &[]);
    assert!(pushed.status.success(), "{}", text(&pushed));
    // A node that trusts only the operator's key (`keys()`): the same
    // installation (so the same digest), the operator's keys.
    let b = Env::node_like(&attacker);
    let manifest = b.path("manifests/web.yaml");
    let text_of = std::fs::read_to_string(&manifest).unwrap();
    let (key, public) = keys();
    std::fs::write(
        &manifest,
        text_of
            .replace(evil_key.to_str().unwrap(), key.to_str().unwrap())
            .replace(evil_pub.to_str().unwrap(), public.to_str().unwrap()),
    )
    .unwrap();
    let out = warmer(&b, &["pull", "web"], &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("image refused: no signature by a trusted key"),
        "{}",
        text(&out)
    );
    assert!(b.entries().is_empty(), "nothing of it entered the cache");
    let mut w = b.run("web");
    let s = b.wait_ready("web", &mut w);
    assert_eq!(s["last_start"], "cold", "{s}");
    assert!(
        s["message"]
            .as_str()
            .unwrap_or_default()
            .contains("image refused"),
        "{s}"
    );
    w.stop();
    // Unsigned is refused too, and so is anything without a key to verify.
    let c = Env::node_like(&attacker);
    let manifest = c.path("manifests/web.yaml");
    let without_keys: String = std::fs::read_to_string(&manifest)
        .unwrap()
        .lines()
        .filter(|l| !l.contains("sign:") && !l.contains("verify:"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&manifest, without_keys).unwrap();
    let out = warmer(
        &c,
        &["pull", "web"],
        &[("WARMER_TRUST_FILE", "/nonexistent")],
    );
    assert!(
        text(&out).contains("no key to verify images with"),
        "{}",
        text(&out)
    );
}

/// The signature is cosign's: a `sha256-<manifest>.sig` artifact whose
/// payload names the image manifest, signed ECDSA P-256 over SHA-256 (DER,
/// base64), checkable with the standard tools against `PREFIX.pub`.
#[test]
fn signatures_are_cosigns_and_verify_with_standard_tools() {
    require_criu();
    let reg = Registry::start(&[]);
    let a = node_with_remote(&reg);
    make_image(&a, "web");
    let out = warmer(&a, &["push", "web", "--json"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p["signed"], true, "{p}");
    let manifest_digest = p["manifest_digest"].as_str().unwrap();
    let tag = format!("{}.sig", manifest_digest.replacen(':', "-", 1));
    assert!(reg.tags("web").contains(&tag), "{}", reg.tags("web"));
    let sig_manifest: serde_json::Value = serde_json::from_str(&get_accept(
        reg.port,
        &format!("/v2/warmer/web/manifests/{tag}"),
        "application/vnd.oci.image.manifest.v1+json",
    ))
    .unwrap();
    let layer = &sig_manifest["layers"][0];
    assert_eq!(
        layer["mediaType"],
        "application/vnd.dev.cosign.simplesigning.v1+json"
    );
    let payload = get_bytes(
        reg.port,
        &format!("/v2/warmer/web/blobs/{}", layer["digest"].as_str().unwrap()),
    );
    let claims: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        claims["critical"]["image"]["docker-manifest-digest"],
        manifest_digest
    );
    assert_eq!(
        claims["critical"]["type"],
        "cosign container image signature"
    );
    assert_eq!(
        claims["critical"]["identity"]["docker-reference"],
        reg.repository("web")
    );
    use base64::Engine;
    let sig = base64::engine::general_purpose::STANDARD
        .decode(
            layer["annotations"]["dev.cosignproject.cosign/signature"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("payload"), &payload).unwrap();
    std::fs::write(dir.path().join("sig"), &sig).unwrap();
    let verify = Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(&keys().1)
        .arg("-signature")
        .arg(dir.path().join("sig"))
        .arg(dir.path().join("payload"))
        .output()
        .unwrap();
    assert!(
        verify.status.success() && String::from_utf8_lossy(&verify.stdout).contains("Verified OK"),
        "{verify:?}"
    );
}

/// GET on the registry with an Accept header; the body as text.
fn get_accept(port: u16, path: &str, accept: &str) -> String {
    String::from_utf8(http_get(port, path, Some(accept))).unwrap()
}

fn get_bytes(port: u16, path: &str) -> Vec<u8> {
    http_get(port, path, None)
}

/// A plain HTTP/1.0 GET (no redirects; the registry serves blobs itself).
fn http_get(port: u16, path: &str, accept: Option<&str>) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{accept}\r\n").unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let at = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&buf[..at]).to_string();
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "{head}"
    );
    buf[at..].to_vec()
}

/// A "registry" that answers a manifest request with gigabytes (declared,
/// or streamed without a length): a pull reads a few MiB at most, fails
/// saying why, and ends promptly, its memory bounded.
#[test]
fn a_huge_manifest_from_a_registry_is_cut_off_at_its_bound() {
    require_criu();
    for declared in [true, false] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut conn = conn;
                    let mut req = [0u8; 4096];
                    let n = conn.read(&mut req).unwrap_or(0);
                    let head = String::from_utf8_lossy(&req[..n]).to_string();
                    if !head.contains("/manifests/") {
                        let _ = conn.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                        );
                        return;
                    }
                    let len = if declared {
                        "Content-Length: 2000000000\r\n"
                    } else {
                        ""
                    };
                    let _ = write!(
                        conn,
                        "HTTP/1.0 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n{len}\r\n"
                    );
                    let zeros = vec![b' '; 1 << 20];
                    for _ in 0..2000 {
                        if conn.write_all(&zeros).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let env = Env::new();
        env.slowweb(
            "web",
            free_port(),
            &["--warmup", "0.1"],
            &remote(&format!("127.0.0.1:{port}/warmer/web"), ""),
        );
        let t = Instant::now();
        let child = env
            .command()
            .args(["pull", "web"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let err = text(&out);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("a manifest of"), "declared {declared}: {err}");
        assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
        // The largest child this test process reaped: bounded.
        // SAFETY: rusage is plain integers; all-zero is a valid value.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes into the struct we own.
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
        assert!(
            usage.ru_maxrss < 400 * 1024,
            "max RSS {} KiB",
            usage.ru_maxrss
        );
    }
}

/// An archive whose names carry terminal escape sequences: refused, and the
/// names are shown escaped (a crafted archive once retitled the terminal).
#[test]
fn names_in_a_crafted_archive_are_shown_escaped() {
    let env = Env::new();
    let archive = env.path("evil.tar");
    let mut out = tar::Builder::new(std::fs::File::create(&archive).unwrap());
    let mut h = tar::Header::new_gnu();
    let data = b"x";
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    out.append_data(&mut h, "\u{1b}]0;pwned\u{7}", &data[..])
        .unwrap();
    out.finish().unwrap();
    drop(out);
    let o = warmer(&env, &["import", archive.to_str().unwrap()], &[]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        !t.contains('\u{1b}') && !t.contains('\u{7}'),
        "raw control bytes: {t:?}"
    );
    assert!(t.contains("\\u{1b}"), "{t}");
}
