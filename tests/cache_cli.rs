//! `warmer cache ls | verify | gc | rm` against a real cache made by real
//! checkpoints.

mod common;

use common::*;

fn warm(env: &Env, name: &str) {
    let port = free_port();
    env.slowweb(name, port, &["--warmup", "0.3"], "");
    let mut w = env.run(name);
    env.wait_image(name, &mut w);
    w.stop();
}

fn cache(env: &Env, args: &[&str]) -> (i32, String, String) {
    let out = env.command().arg("cache").args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ls_verify_rm_and_gc() {
    require_criu();
    let env = Env::new();
    warm(&env, "one");
    warm(&env, "two");

    let (code, out, _) = cache(&env, &["ls", "--json"]);
    assert_eq!(code, 0);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2);
    for r in rows.as_array().unwrap() {
        assert_eq!(r["current"], true, "{r}");
        assert_eq!(r["verified_this_boot"], true, "{r}");
        assert!(r["bytes"].as_u64().unwrap() > 1_000_000);
        assert!(r["host"]["kernel"].is_string());
    }
    let (code, out, _) = cache(&env, &["ls"]);
    assert_eq!(code, 0);
    assert!(out.contains("one") && out.contains("current"), "{out}");

    // verify: all good, then one flipped bit.
    let (code, out, _) = cache(&env, &["verify"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("ok ").count(), 2, "{out}");
    let two = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"] == "two")
        .unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    flip_bit_in_pages(&env.path(&format!("cache/entries/{two}")), 0x80);
    let (code, out, _) = cache(&env, &["verify", "two"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("BAD") && out.contains("checksum mismatch"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_dir(env.path("cache/quarantine"))
            .unwrap()
            .count(),
        1
    );

    // rm by digest prefix, then by name.
    let (code, out, _) = cache(&env, &["rm", "zzzz"]);
    assert_eq!(code, 1, "{out}");
    warm(&env, "two");
    let two = env.status("two")["image"]["key"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, _, err) = cache(&env, &["rm", &two[..10]]);
    assert_eq!(code, 0, "{err}");
    assert!(env.entries().iter().all(|e| !e.ends_with(&two)));
    let (code, out, _) = cache(&env, &["rm", "one"]);
    assert_eq!(code, 0);
    assert!(out.contains("removed"), "{out}");
    assert!(env.entries().is_empty());

    // gc: a stale digest goes before a current one under --max-bytes.
    warm(&env, "one");
    let (_, out, _) = cache(&env, &["ls", "--json"]);
    let size = serde_json::from_str::<serde_json::Value>(&out).unwrap()[0]["bytes"]
        .as_u64()
        .unwrap();
    let script = env.app();
    std::fs::write(
        &script,
        format!("{}\n# v2\n", std::fs::read_to_string(&script).unwrap()),
    )
    .unwrap();
    warm(&env, "one");
    assert_eq!(env.entries().len(), 2);
    let (code, out, _) = cache(
        &env,
        &["gc", "--max-bytes", &(size * 3 / 2).to_string(), "--json"],
    );
    assert_eq!(code, 0);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["removed"].as_array().unwrap().len(), 1, "{report}");
    assert!(report["removed"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("stale digest"));
    let (_, out, _) = cache(&env, &["ls", "--json"]);
    let left: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(left[0]["current"], true);
    let (code, out, _) = cache(&env, &["gc", "--max-age", "0s"]);
    assert_eq!(code, 0, "{out}");
}
