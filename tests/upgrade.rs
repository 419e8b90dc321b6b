//! What an upgrade of warmer invalidates: nothing but what a restore depends
//! on. Every image maps `warmer-init`, so its bytes are a digest input; a new
//! release of warmer must leave them identical (or every image on every
//! machine would go cold at once), while a real change to the init must not.
//!
//! Builds `warmer-init` (release profile, as installed) from copies of this
//! workspace: as it is, with the workspace version bumped, and with the init
//! changed.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A copy of the workspace's tracked files, built in its own target dir;
/// `edit` changes the copy first. Returns the sha256 of its warmer-init.
fn build_copy(name: &str, edit: &dyn Fn(&Path)) -> String {
    let dir = tempfile::Builder::new()
        .prefix(&format!("warmer-upgrade-{name}-"))
        .tempdir()
        .unwrap();
    let files = Command::new("git")
        .arg("-C")
        .arg(repo())
        .args([
            "ls-files",
            "-z",
            "--",
            "Cargo.toml",
            "Cargo.lock",
            "init",
            "cache",
            "warmer",
            "tests",
            "benches",
        ])
        .output()
        .expect("git ls-files");
    assert!(files.status.success());
    for rel in files.stdout.split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let rel = Path::new(std::str::from_utf8(rel).unwrap());
        let to = dir.path().join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(repo().join(rel), &to).unwrap();
    }
    edit(dir.path());
    let out = Command::new(env!("CARGO"))
        .args(["build", "--release", "--offline", "-p", "warmer-init"])
        .current_dir(dir.path())
        .env("CARGO_TARGET_DIR", dir.path().join("target"))
        .output()
        .expect("cargo build");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = dir.path().join("target/release/warmer-init");
    warmer::digest::sha256_file(&bin).unwrap()
}

fn replace_in(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains(from), "{} lacks {from:?}", file.display());
    std::fs::write(file, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn a_new_warmer_release_keeps_warmer_init_and_so_every_image() {
    let base = build_copy("base", &|_| {});
    let bumped = build_copy("bumped", &|root| {
        let manifest = root.join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest).unwrap();
        let version = text
            .lines()
            .find(|l| l.starts_with("version = "))
            .expect("workspace version line")
            .to_string();
        replace_in(&manifest, &version, "version = \"99.1.0\"");
        // The lock file records workspace members' versions too.
        let lock = root.join("Cargo.lock");
        let lock_text = std::fs::read_to_string(&lock).unwrap();
        let old = version.trim_start_matches("version = ");
        let bumped = lock_text
            .replace(
                &format!("name = \"warmer\"\nversion = {old}"),
                "name = \"warmer\"\nversion = \"99.1.0\"",
            )
            .replace(
                &format!("name = \"warmer-cache\"\nversion = {old}"),
                "name = \"warmer-cache\"\nversion = \"99.1.0\"",
            );
        assert_ne!(
            bumped, lock_text,
            "the lock file names the workspace version"
        );
        std::fs::write(&lock, bumped).unwrap();
    });
    assert_eq!(
        base, bumped,
        "bumping warmer's version changed warmer-init's bytes: every image would be invalidated"
    );
    // The check can fail: a real change to the init changes its bytes.
    let changed = build_copy("changed", &|root| {
        replace_in(
            &root.join("init/src/init_loop.rs"),
            "warmer-init: cannot enter",
            "warmer-init: could not enter",
        );
    });
    assert_ne!(base, changed, "a changed init must change the digest");
}
