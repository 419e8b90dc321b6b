//! Restored, not cloned: a service can tell every restore apart (its
//! signal, its hook, the restore-info file), and its hooks run around
//! checkpoints and restores. Real CRIU, `examples/slowweb`.

mod common;

use common::*;

/// One restore of `name`'s image: (its `/random` draw, its `/restored`).
fn restore_once(env: &Env, name: &str, port: u16) -> (u64, serde_json::Value) {
    let mut w = env.run(name);
    let s = env.wait_ready(name, &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    let draw = serde_json::from_str::<serde_json::Value>(&get(port, "/random").unwrap()).unwrap()
        ["random"]
        .as_u64()
        .unwrap();
    let info = get(port, "/restored")
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null);
    w.stop();
    (draw, info)
}

#[test]
fn without_a_signal_restores_repeat_their_draws_and_with_one_they_differ() {
    require_criu();
    let env = Env::new();
    // Without: the same memory, the same generator, the same draw.
    let plain = free_port();
    env.slowweb("same", plain, &["--warmup", "0.3"], "");
    env.make_image("same", plain);
    let (a, _) = restore_once(&env, "same", plain);
    let (b, _) = restore_once(&env, "same", plain);
    assert_eq!(a, b, "a restore repeats what the image's memory draws next");
    // With `restore.signal` the service reseeds at every restore.
    let port = free_port();
    env.slowweb(
        "unique",
        port,
        &["--warmup", "0.3"],
        "restore: {signal: SIGUSR2}\n",
    );
    env.make_image("unique", port);
    let (c, first) = restore_once(&env, "unique", port);
    let (d, second) = restore_once(&env, "unique", port);
    assert_ne!(c, d, "each restore draws its own");
    // The restore-info file: rewritten before each restore, readable.
    assert_eq!(first["restores"], 1, "{first}");
    assert_eq!(second["restores"], 2, "{second}");
    assert_eq!(first["image"], second["image"]);
    assert_eq!(first["origin"], "local");
    assert_ne!(first["random"], second["random"]);
    assert_eq!(first["random"].as_str().unwrap().len(), 64);
    use std::os::unix::fs::MetadataExt;
    let mode = std::fs::metadata(env.run.join("unique/restore-info.json"))
        .unwrap()
        .mode();
    assert_eq!(mode & 0o777, 0o644, "readable by the service's user");
}

#[test]
fn a_failing_after_restore_hook_undoes_the_restore_and_says_why() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    env.slowweb(
        "hooked",
        port,
        &["--warmup", "0.3"],
        "hooks: {after_restore: [\"/bin/sh\", \"-c\", \"exit 3\"]}\n",
    );
    let nonce = env.make_image("hooked", port);
    let mut w = env.run("hooked");
    let s = env.wait_ready("hooked", &mut w);
    assert_eq!(s["last_start"], "cold", "{s}");
    let msg = s["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("after_restore") && msg.contains("exit status: 3"),
        "{s}"
    );
    assert_ne!(state(port)["nonce"], nonce, "a new process");
    w.stop();
}

/// Everything each file of the entry holds, as one byte string.
fn image_bytes(entry: &std::path::Path) -> Vec<u8> {
    let mut all = Vec::new();
    for f in walk(&entry.join("data")) {
        all.extend(std::fs::read(f).unwrap());
    }
    all
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(dir).unwrap() {
        let p = d.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_before_checkpoint_hook_keeps_a_secret_out_of_the_image() {
    require_criu();
    let env = Env::new();
    let secret = format!("s3cr3t-{}", std::process::id());
    let file = env.path("secret");
    std::fs::write(&file, &secret).unwrap();
    let holds = |entry: &std::path::Path| {
        image_bytes(entry)
            .windows(secret.len())
            .any(|w| w == secret.as_bytes())
    };
    // Without the hook, the image holds it.
    let port = free_port();
    env.slowweb(
        "keeps",
        port,
        &["--warmup", "0.3", "--secret-file", file.to_str().unwrap()],
        "",
    );
    env.make_image("keeps", port);
    let entry = env.entries().pop().unwrap();
    assert!(holds(&entry), "the service's memory holds the secret");
    std::fs::remove_dir_all(env.path("cache/entries")).unwrap();
    // With it, the service drops it before the dump.
    let port = free_port();
    env.slowweb(
        "drops",
        port,
        &["--warmup", "0.3", "--secret-file", file.to_str().unwrap()],
        &format!(
            "hooks:\n  before_checkpoint: [\"/usr/bin/python3\", \"-c\", \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/drop-secret').read()\"]\n"
        ),
    );
    let mut w = env.run("drops");
    env.wait_image("drops", &mut w);
    w.stop();
    let entry = env.entries().pop().unwrap();
    assert!(!holds(&entry), "no file of the image holds the secret");
}

#[test]
fn a_hook_that_runs_too_long_is_killed_and_there_is_no_checkpoint() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    env.slowweb(
        "slowhook",
        port,
        &["--warmup", "0.2"],
        "hooks: {before_checkpoint: [\"/bin/sleep\", \"97.5\"], timeout: 1s}\n",
    );
    let mut w = env.run("slowhook");
    let s = env.wait_status("slowhook", &mut w, |s| !s["message"].is_null());
    let msg = s["message"].as_str().unwrap();
    assert!(
        msg.contains("before_checkpoint") && msg.contains("did not end within 1s"),
        "{msg}"
    );
    assert!(s["image"].is_null(), "{s}");
    assert!(pids_with("97.5").is_empty(), "the hook was killed");
    w.stop();
}

#[test]
fn a_before_checkpoint_hook_runs_at_a_persist_stop_inside_the_service() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    let marker = env.path("marker");
    env.slowweb(
        "pstop",
        port,
        &["--warmup", "0.2"],
        &format!(
            "mode: persist\nhooks:\n  before_checkpoint: [\"/bin/sh\", \"-c\", \"echo $$ $WARMER_RESTORE_INFO > {}\"]\n",
            marker.display()
        ),
    );
    let mut w = env.run("pstop");
    env.wait_ready("pstop", &mut w);
    assert!(!marker.exists(), "no checkpoint at ready in persist mode");
    w.stop();
    let text = std::fs::read_to_string(&marker).unwrap();
    let mut words = text.split_whitespace();
    let pid: i32 = words.next().unwrap().parse().unwrap();
    assert!(pid < 100, "a PID of the service's own namespace: {text}");
    assert!(
        words.next().unwrap().ends_with("pstop/restore-info.json"),
        "the service's environment: {text}"
    );
    assert_eq!(env.entries().len(), 1, "the stop's image");
}

/// An image holds the service's environment: `inspect` names the variables
/// that look like secrets (never their values), `validate` warns when such
/// an image would be pushed, and `checkpoint.forbid_env` refuses to take it.
#[test]
fn secrets_in_the_environment_are_named_warned_about_and_can_be_refused() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    env.slowweb(
        "envy",
        port,
        &["--warmup", "0.2"],
        "env: {API_TOKEN: \"tok-9f8e7d\", PLAIN_SETTING: \"x\"}\nremote: {repository: \"127.0.0.1:1/warmer/envy\", push: true}\n",
    );
    let mut w = env.run("envy");
    env.wait_image("envy", &mut w);
    w.stop();
    let out = env
        .command()
        .args(["inspect", "envy", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let i: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let service = i["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["cmdline"][0] == "/usr/bin/python3")
        .unwrap();
    let names: Vec<&str> = service["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        names.contains(&"API_TOKEN") && names.contains(&"PLAIN_SETTING"),
        "{service}"
    );
    assert_eq!(
        service["secret_env"],
        serde_json::json!(["API_TOKEN"]),
        "{service}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("tok-9f8e7d"),
        "never the value"
    );
    let table = env.command().args(["inspect", "envy"]).output().unwrap();
    assert!(String::from_utf8_lossy(&table.stdout)
        .contains("holds secrets in its environment: API_TOKEN"));
    let out = env
        .command()
        .arg("validate")
        .arg(env.path("manifests/envy.yaml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("remote.push") && err.contains("API_TOKEN"),
        "{err}"
    );
    // Refused at the checkpoint.
    let port = free_port();
    env.slowweb(
        "forbid",
        port,
        &["--warmup", "0.2"],
        "env: {API_TOKEN: \"tok\"}\ncheckpoint: {forbid_env: [\"*TOKEN*\"]}\n",
    );
    let mut w = env.run("forbid");
    let s = env.wait_status("forbid", &mut w, |s| !s["message"].is_null());
    let msg = s["message"].as_str().unwrap();
    assert!(
        msg.contains("forbid_env") && msg.contains("API_TOKEN"),
        "{msg}"
    );
    assert!(s["image"].is_null());
    w.stop();
}
