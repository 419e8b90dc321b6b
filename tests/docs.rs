//! Man pages and completions come from the command line's own definition
//! (and the manifest key table): `man warmer`, `man warmer.yaml` and a
//! completion of `warmer status <TAB>` work, and say what `--help` says.

mod common;

use std::process::Command;

use common::WARMER;

fn render(page: &std::path::Path) -> String {
    let out = Command::new("man")
        .arg("-l")
        .arg(page)
        .env("MANWIDTH", "200")
        .env("MAN_KEEP_FORMATTING", "0")
        .output()
        .expect("man (scripts/deps.sh installs man-db)");
    assert!(out.status.success(), "{out:?}");
    // Plain text: drop the overstrikes (c BACKSPACE c) grotty uses for bold.
    let mut text = String::new();
    for c in String::from_utf8_lossy(&out.stdout).chars() {
        if c == '\u{8}' {
            text.pop();
        } else {
            text.push(c);
        }
    }
    text.replace(['\u{2010}', '\u{2212}'], "-")
}

#[test]
fn man_pages_render_and_say_what_help_says() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(WARMER)
        .arg("man")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let top = render(&dir.path().join("warmer.1"));
    assert!(
        top.contains("warmer") && top.contains("SUBCOMMANDS"),
        "{top}"
    );
    // Every subcommand --help shows has a page naming each of its flags.
    for sub in [
        "run",
        "status",
        "bench",
        "pull",
        "keygen",
        "reset",
        "completions",
        "adopt",
    ] {
        let page = render(&dir.path().join(format!("warmer-{sub}.1")));
        let help = Command::new(WARMER).args([sub, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&help.stdout).to_string();
        for flag in help
            .split_whitespace()
            .filter(|w| w.starts_with("--") && w.len() > 3)
            .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
        {
            // Global flags are on warmer(1).
            assert!(
                page.contains(flag) || top.contains(flag),
                "{sub}: {flag} is in --help, in no man page\n{page}"
            );
        }
    }
    let init = render(&dir.path().join("warmer-init.8"));
    assert!(init.contains("PID 1 of a service"), "{init}");
    let yaml = render(&dir.path().join("warmer.yaml.5"));
    for key in warmer::manifest::keys::KEYS {
        assert!(
            yaml.contains(key.path),
            "{} missing from warmer.yaml(5)",
            key.path
        );
    }
}

#[test]
fn bash_completes_subcommands_and_service_names() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.yaml"), "").unwrap();
    std::fs::write(dir.path().join("db.yml"), "").unwrap();
    let script = dir.path().join("warmer.bash");
    let out = Command::new(WARMER)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(&script, &out.stdout).unwrap();
    let complete = |words: &str, cword: usize| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=({words}); COMP_CWORD={cword}; _warmer_with_services warmer; echo \"${{COMPREPLY[*]}}\"",
                script.display()
            ))
            .env("WARMER_MANIFEST_DIR", dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let services = complete("warmer status ''", 2);
    let mut got: Vec<&str> = services.split_whitespace().collect();
    got.sort_unstable();
    assert_eq!(got, ["db", "web"]);
    assert!(complete("warmer sta", 1)
        .split_whitespace()
        .any(|w| w == "status"));
    for shell in ["zsh", "fish"] {
        let out = Command::new(WARMER)
            .args(["completions", shell])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("__warmer_services")
                || text.contains("_warmer_services"),
            "{shell}: {text}"
        );
    }
}

/// The Debian package's version is the workspace's, and `--version` names
/// the formats its postinst compares across an upgrade.
#[test]
fn the_package_version_is_the_release_and_version_names_the_formats() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let changelog = std::fs::read_to_string(repo.join("debian/changelog")).unwrap();
    let first = changelog.lines().next().unwrap();
    assert!(
        first.starts_with(&format!("warmer ({}) ", env!("CARGO_PKG_VERSION"))),
        "debian/changelog says {first:?}, Cargo.toml {}",
        env!("CARGO_PKG_VERSION")
    );
    let out = Command::new(WARMER).arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("image format {}", warmer::image::IMAGE_FORMAT))
            && text.contains(&format!("cache format {}", cache::FORMAT_VERSION)),
        "{text}"
    );
}
