//! A JVM service as installed (no special flags in its manifest) restores:
//! HotSpot's perf-data file in /tmp would otherwise make every restore fail
//! (`Can't open file tmp/hsperfdata_root/2`). Real CRIU, the system's JDK.

mod common;

use std::process::Command;

use common::*;

/// `examples/jvm/Hello.java`, compiled into the env; its classes directory.
fn hello_classes(env: &Env) -> std::path::PathBuf {
    let classes = env.path("classes");
    let javac = Command::new("javac")
        .arg("-d")
        .arg(&classes)
        .arg(repo().join("examples/jvm/Hello.java"))
        .output()
        .expect("javac (scripts/deps.sh installs default-jdk-headless)");
    assert!(
        javac.status.success(),
        "{}",
        String::from_utf8_lossy(&javac.stderr)
    );
    classes
}

#[test]
fn a_jvm_service_restores_as_installed() {
    require_criu();
    let env = Env::new();
    let classes = hello_classes(&env);
    let port = free_port();
    env.write_manifest(
        "jvm",
        &format!(
            "exec: [\"java\", \"-cp\", \"{}\", \"Hello\", \"{port}\"]\nready: {{http: \"http://127.0.0.1:{port}/\", timeout: 60s}}\ncheckpoint: {{settle: 300ms}}\n",
            classes.display()
        ),
    );
    let mut w = env.run("jvm");
    env.wait_image("jvm", &mut w);
    let nonce = get(port, "/").unwrap();
    w.stop();
    let mut w = env.run("jvm");
    let s = env.wait_ready("jvm", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    assert_eq!(get(port, "/").unwrap(), nonce, "the same JVM, restored");
    w.stop();
}

/// A JVM reacting through its hook: `after_restore` asks it to reseed its
/// java.util.Random, so two restores of one image draw differently (without
/// the hook they repeat).
#[test]
fn a_jvm_reseeds_through_its_after_restore_hook() {
    require_criu();
    let env = Env::new();
    let classes = hello_classes(&env);
    let draws = |name: &str, hook: bool| -> (String, String) {
        let port = free_port();
        let hooks = if hook {
            format!("hooks: {{after_restore: [\"/usr/bin/python3\", \"-c\", \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/reseed').read()\"]}}\n")
        } else {
            String::new()
        };
        env.write_manifest(
            name,
            &format!(
                "exec: [\"java\", \"-cp\", \"{}\", \"Hello\", \"{port}\"]\nready: {{http: \"http://127.0.0.1:{port}/\", timeout: 60s}}\ncheckpoint: {{settle: 300ms}}\n{hooks}",
                classes.display()
            ),
        );
        let mut w = env.run(name);
        env.wait_image(name, &mut w);
        w.stop();
        let draw = || {
            let mut w = env.run(name);
            let s = env.wait_ready(name, &mut w);
            assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
            let d = get(port, "/random").unwrap();
            w.stop();
            d
        };
        (draw(), draw())
    };
    let (a, b) = draws("jvm-same", false);
    assert_eq!(a, b, "restores repeat the image's generator");
    let (c, d) = draws("jvm-hook", true);
    assert_ne!(c, d, "the hook reseeds each restore");
}
