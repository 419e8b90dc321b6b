//! A crash at any point of publish leaves no entry or a whole one, and the
//! next open cleans the leftovers. The crash is a real abort() of a forked
//! child at a failpoint (feature `failpoints`).

use std::fs;

use cache::{Cache, NewEntry};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

const DIGEST: &str = "abcdefabcdefabcdefabcdefabcdefabcdefabcdefabcdefabcdefabcdefabcd";

/// Publishes in a child that aborts at `point`; returns the cache root.
fn crash_at(point: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let root = dir.join("c");
    Cache::open(&root).unwrap();
    // SAFETY: the child only touches the cache (files, no locks shared with
    // other test threads' state) and then exits or aborts.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            // SAFETY: single-threaded child.
            unsafe { std::env::set_var("CACHE_FAILPOINT", point) };
            let cache = Cache::open(&root).unwrap();
            let staging = cache.stage().unwrap();
            fs::write(staging.data_dir().join("pages-1.img"), vec![1u8; 4096]).unwrap();
            let _ = cache.publish(
                staging,
                NewEntry {
                    service: "web".into(),
                    digest: DIGEST.into(),
                    ..Default::default()
                },
            );
            std::process::exit(0);
        }
        ForkResult::Parent { child } => {
            let st = waitpid(child, None).unwrap();
            assert!(
                matches!(
                    st,
                    WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGABRT, _)
                ),
                "child should abort at {point}: {st:?}"
            );
        }
    }
    root
}

#[test]
fn crash_before_the_rename_leaves_no_entry_and_no_leftovers() {
    for point in ["publish-before-meta", "publish-before-rename"] {
        let dir = tempfile::tempdir().unwrap();
        let root = crash_at(point, dir.path());
        assert!(
            fs::read_dir(root.join("tmp")).unwrap().next().is_some(),
            "staging left by the crash"
        );
        let cache = Cache::open(&root).unwrap();
        assert!(cache.lookup(DIGEST).unwrap().is_none(), "{point}: no entry");
        assert!(
            fs::read_dir(root.join("tmp")).unwrap().next().is_none(),
            "{point}: cleaned"
        );
    }
}

#[test]
fn crash_after_the_rename_leaves_a_whole_entry() {
    let dir = tempfile::tempdir().unwrap();
    let root = crash_at("publish-after-rename", dir.path());
    let cache = Cache::open(&root).unwrap();
    let entry = cache.lookup(DIGEST).unwrap().expect("entry published");
    cache.verify(&entry, &mut |_, _| {}).unwrap();
}
