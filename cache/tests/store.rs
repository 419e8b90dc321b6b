//! The store's behaviour on real files: publish, lookup, every kind of damage.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;

use cache::{Cache, NewEntry, Problem};

const DIGEST: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
/// The first (only) generation of DIGEST.
const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff.1";

fn new_entry(digest: &str) -> NewEntry {
    NewEntry {
        service: "web".into(),
        digest: digest.into(),
        cold_start_ms: Some(2000),
        ..Default::default()
    }
}

/// `e` as made `ago` seconds ago (instead of sleeping past the one-second
/// resolution of creation times).
fn made_ago(mut e: NewEntry, ago: u64) -> NewEntry {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    e.created = Some((format!("{ago} s ago"), now - ago));
    e
}

fn published(dir: &tempfile::TempDir) -> (Cache, cache::Entry) {
    let cache = Cache::open(dir.path().join("c")).unwrap();
    let staging = cache.stage().unwrap();
    fs::write(staging.data_dir().join("pages-1.img"), vec![7u8; 100_000]).unwrap();
    fs::create_dir(staging.data_dir().join("state")).unwrap();
    fs::write(staging.data_dir().join("state/dump.rdb"), b"rdb").unwrap();
    let entry = cache.publish(staging, new_entry(DIGEST)).unwrap();
    (cache, entry)
}

fn verify(cache: &Cache, digest: &str) -> Result<(), Problem> {
    let entry = cache.lookup(digest).unwrap().unwrap();
    cache.verify(&entry, &mut |_, _| {})
}

#[test]
fn published_entry_is_whole_private_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, entry) = published(&dir);
    assert_eq!(entry.meta.bytes, 100_003);
    assert_eq!(entry.meta.files.len(), 2);
    assert_eq!(entry.meta.cold_start_ms, Some(2000));
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(cache.root()), 0o700);
    assert_eq!(mode(&entry.dir), 0o700);
    assert_eq!(mode(&entry.data_dir().join("pages-1.img")), 0o600);
    assert_eq!(mode(&entry.dir.join("meta.json")), 0o600);
    assert!(fs::read_dir(cache.root().join("tmp"))
        .unwrap()
        .next()
        .is_none());
    verify(&cache, DIGEST).unwrap();
}

#[test]
fn flipped_bit_is_a_checksum_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, entry) = published(&dir);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(entry.data_dir().join("pages-1.img"))
        .unwrap();
    f.seek(SeekFrom::Start(4242)).unwrap();
    f.write_all(&[7 ^ 0x10]).unwrap();
    assert_eq!(
        verify(&cache, DIGEST),
        Err(Problem::Checksum {
            path: "pages-1.img".into()
        })
    );
}

#[test]
fn truncated_missing_and_extra_files_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, entry) = published(&dir);
    let pages = entry.data_dir().join("pages-1.img");
    fs::OpenOptions::new()
        .write(true)
        .open(&pages)
        .unwrap()
        .set_len(10)
        .unwrap();
    assert!(matches!(
        verify(&cache, DIGEST),
        Err(Problem::Size { found: 10, .. })
    ));
    fs::remove_file(&pages).unwrap();
    assert!(matches!(
        verify(&cache, DIGEST),
        Err(Problem::Missing { .. })
    ));

    let dir = tempfile::tempdir().unwrap();
    let (cache, entry) = published(&dir);
    let extra = entry.data_dir().join("core-99.img");
    fs::write(&extra, b"x").unwrap();
    fs::set_permissions(&extra, fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        verify(&cache, DIGEST),
        Err(Problem::Unexpected {
            path: "core-99.img".into()
        })
    );
}

#[test]
fn loose_modes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, entry) = published(&dir);
    let pages = entry.data_dir().join("pages-1.img");
    fs::set_permissions(&pages, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(verify(&cache, DIGEST), Err(Problem::Mode { .. })));
    fs::set_permissions(&pages, fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(&entry.dir, fs::Permissions::from_mode(0o755)).unwrap();
    assert!(matches!(verify(&cache, DIGEST), Err(Problem::Mode { .. })));
}

#[test]
fn unknown_format_version_and_bad_meta_are_damage() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, entry) = published(&dir);
    let meta = entry.dir.join("meta.json");
    let text = fs::read_to_string(&meta).unwrap();
    fs::write(
        &meta,
        text.replace("\"format_version\": 2", "\"format_version\": 99"),
    )
    .unwrap();
    match cache.lookup(DIGEST) {
        Err(cache::Error::Damaged { problem, .. }) => {
            assert_eq!(problem, Problem::UnknownFormat(99))
        }
        other => panic!("expected damage, got {other:?}"),
    }
    fs::write(&meta, "{ not json").unwrap();
    assert!(matches!(
        cache.lookup(DIGEST),
        Err(cache::Error::Damaged {
            problem: Problem::BadMeta(_),
            ..
        })
    ));
    let q = cache.quarantine(KEY, "bad meta").unwrap();
    assert!(q.join("REASON").exists());
    assert!(cache.lookup(DIGEST).unwrap().is_none());
}

#[test]
fn staging_leftovers_of_dead_processes_are_cleaned_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path().join("c")).unwrap();
    // A pid that cannot exist (above pid_max) stands for a crashed writer.
    let dead = cache.root().join("tmp/stage-99999999-1");
    fs::create_dir_all(dead.join("data")).unwrap();
    let live = cache.stage().unwrap();
    Cache::open(cache.root()).unwrap();
    assert!(!dead.exists(), "leftover of a dead writer is removed");
    assert!(live.data_dir().exists(), "a live writer's staging is kept");
}

#[test]
fn publishing_a_digest_again_makes_a_new_current_generation_and_a_rollback_pins_an_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, first) = published(&dir);
    assert_eq!((first.key.as_str(), first.meta.generation), (KEY, 1));
    let publish = |name: &str| {
        let staging = cache.stage().unwrap();
        fs::write(staging.data_dir().join(name), name.as_bytes()).unwrap();
        cache.publish(staging, new_entry(DIGEST)).unwrap()
    };
    let second = publish("second.img");
    assert_eq!(second.meta.generation, 2);
    assert_eq!(cache.lookup(DIGEST).unwrap().unwrap().key, second.key);
    verify(&cache, DIGEST).unwrap();
    // A rollback: the next lookup returns generation 1 until a newer one.
    cache.pin(KEY).unwrap();
    assert_eq!(cache.pinned(DIGEST).as_deref(), Some(KEY));
    assert_eq!(cache.lookup(DIGEST).unwrap().unwrap().key, KEY);
    let third = publish("third.img");
    assert_eq!(third.meta.generation, 3);
    assert_eq!(cache.pinned(DIGEST), None, "a new generation lifts the pin");
    assert_eq!(cache.lookup(DIGEST).unwrap().unwrap().key, third.key);
    // Numbers are never reused, even after an entry is gone.
    cache.quarantine(&third.key, "test").unwrap();
    let fourth = publish("fourth.img");
    assert_eq!(fourth.meta.generation, 4);
    cache
        .quarantine(&fourth.key, "twice in a second is fine")
        .unwrap();
    // Removing a pinned generation lifts its pin too.
    cache.pin(&second.key).unwrap();
    cache.remove(&second.key).unwrap();
    assert_eq!(cache.lookup(DIGEST).unwrap().unwrap().key, KEY);
    assert!(cache.pin(&second.key).is_err(), "no pin on a missing entry");
}

#[test]
fn a_layout_1_cache_is_migrated_to_generations() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, entry) = published(&dir);
    let root = cache.root().to_path_buf();
    // Make it look like layout 1: entry named by digest, meta format 1.
    let meta = entry.dir.join("meta.json");
    let text = fs::read_to_string(&meta)
        .unwrap()
        .replace("\"format_version\": 2", "\"format_version\": 1")
        .replace("\"generation\": 1,", "");
    fs::write(&meta, text).unwrap();
    fs::rename(&entry.dir, root.join("entries").join(DIGEST)).unwrap();
    fs::write(root.join("stale").join(DIGEST), "old reason\n").unwrap();
    fs::write(root.join("VERSION"), "warmer-cache 1\n").unwrap();
    let cache = Cache::open(&root).unwrap();
    assert_eq!(
        fs::read_to_string(root.join("VERSION")).unwrap(),
        "warmer-cache 2\n"
    );
    let e = cache.lookup(DIGEST).unwrap().unwrap();
    assert_eq!((e.key.as_str(), e.meta.generation), (KEY, 1));
    assert_eq!(e.stale.as_deref(), Some("old reason"));
    cache.verify(&e, &mut |_, _| {}).unwrap();
}

#[test]
fn prune_keeps_the_newest_and_the_protected() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path().join("c")).unwrap();
    let digests: Vec<String> = (0..4).map(|i| format!("{i:064x}")).collect();
    for d in &digests {
        let staging = cache.stage().unwrap();
        fs::write(staging.data_dir().join("x"), d.as_bytes()).unwrap();
        // All in the same second: the order is the generations'.
        cache.publish(staging, new_entry(d)).unwrap();
    }
    let key = |i: usize| format!("{}.{}", digests[i], i + 1);
    let removed = cache.prune_service("web", 1, Some(&key(0))).unwrap();
    assert_eq!(removed, vec![key(2), key(1)]);
    assert!(cache.lookup(&digests[3]).unwrap().is_some());
    assert!(cache.lookup(&digests[0]).unwrap().is_some());
}

#[test]
fn second_lock_on_a_service_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path().join("c")).unwrap();
    let _held = cache.lock_service("web", false).unwrap();
    assert!(matches!(
        cache.lock_service("web", false),
        Err(cache::Error::Locked { .. })
    ));
    assert!(cache.lock_service("db", false).is_ok());
}

#[test]
fn a_stamp_from_this_boot_spares_the_hashing_until_a_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, entry) = published(&dir);
    assert!(cache.stamp_valid(&entry), "publish leaves a stamp");
    assert_eq!(
        cache.ensure_verified(&entry, &mut |_, _| {}),
        Ok(cache::Verification::Stamped)
    );
    // Same size, same mtime restored: ctime still gives the change away.
    let pages = entry.data_dir().join("pages-1.img");
    let mtime = fs::metadata(&pages).unwrap().modified().unwrap();
    let mut bytes = fs::read(&pages).unwrap();
    bytes[10] ^= 1;
    fs::write(&pages, bytes).unwrap();
    fs::File::options()
        .write(true)
        .open(&pages)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert!(!cache.stamp_valid(&entry));
    assert!(matches!(
        cache.ensure_verified(&entry, &mut |_, _| {}),
        Err(Problem::Checksum { .. })
    ));
}

#[test]
fn a_full_verification_stamps_and_a_stamp_of_another_boot_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, entry) = published(&dir);
    let stamp = cache.root().join("verified").join(KEY);
    let text = fs::read_to_string(&stamp).unwrap();
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    fs::write(
        &stamp,
        text.replace(boot.trim(), "00000000-0000-0000-0000-000000000000"),
    )
    .unwrap();
    assert!(
        !cache.stamp_valid(&entry),
        "another boot's stamp does not count"
    );
    let mut seen = 0;
    assert_eq!(
        cache.ensure_verified(&entry, &mut |done, _| seen = done),
        Ok(cache::Verification::Hashed)
    );
    assert_eq!(seen, entry.meta.bytes, "progress reached the end");
    assert!(cache.stamp_valid(&entry), "the verification stamped it");
}

#[test]
fn stale_entries_are_flagged_and_gc_removes_them_first() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path().join("c")).unwrap();
    let mk = |i: u32, service: &str, size: usize| {
        let staging = cache.stage().unwrap();
        fs::write(
            staging.data_dir().join("img"),
            vec![u8::try_from(i).unwrap(); size],
        )
        .unwrap();
        let mut e = made_ago(new_entry(&format!("{i:064x}")), 100 - u64::from(i));
        e.service = service.into();
        cache.publish(staging, e).unwrap();
    };
    mk(1, "a", 1000); // oldest, current
    mk(2, "b", 1000); // stale digest (not current)
    mk(3, "a", 1000); // marked stale
    mk(4, "c", 1000); // newest, current
    cache
        .mark_stale(&format!("{:064x}.2", 3), "server.py changed")
        .unwrap();
    let e3 = cache.lookup(&format!("{:064x}", 3)).unwrap().unwrap();
    assert_eq!(e3.stale.as_deref(), Some("server.py changed"));

    let current = |m: &cache::Meta| m.digest != format!("{:064x}", 2);
    // No limits: only the marked entry goes.
    let r = cache.gc(&cache::GcPolicy::default(), &current).unwrap();
    let gone: Vec<_> = r.removed.iter().map(|x| x.key.clone()).collect();
    assert_eq!(gone, vec![format!("{:064x}.2", 3)]);
    // Room for two: the stale digest goes before the older current one.
    let policy = cache::GcPolicy {
        max_bytes: Some(2000),
        max_age: None,
    };
    let r = cache.gc(&policy, &current).unwrap();
    let gone: Vec<_> = r.removed.iter().map(|x| x.key.clone()).collect();
    assert_eq!(gone, vec![format!("{:064x}.1", 2)]);
    assert_eq!(r.kept_bytes, 2000);
    // Room for one: the oldest current entry goes.
    let policy = cache::GcPolicy {
        max_bytes: Some(1000),
        max_age: None,
    };
    let r = cache.gc(&policy, &current).unwrap();
    assert_eq!(r.removed[0].key, format!("{:064x}.1", 1));
    // Age: everything is older than zero seconds (made 96+ s ago).
    let policy = cache::GcPolicy {
        max_bytes: None,
        max_age: Some(std::time::Duration::from_secs(0)),
    };
    let r = cache.gc(&policy, &current).unwrap();
    assert_eq!(r.removed.len(), 1);
    assert!(cache.list().unwrap().is_empty());
}

#[test]
fn gc_leaves_a_busy_service_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _) = published(&dir);
    cache.mark_stale(KEY, "test").unwrap();
    let _busy = cache.lock_service("web", false).unwrap();
    let r = cache.gc(&cache::GcPolicy::default(), &|_| true).unwrap();
    assert!(r.removed.is_empty());
    assert_eq!(r.skipped.len(), 1);
    assert!(cache.lookup(DIGEST).unwrap().is_some());
}

#[test]
fn many_openers_of_a_new_cache_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("fresh");
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let root = root.clone();
            std::thread::spawn(move || Cache::open(&root).map(|_| ()))
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
    assert_eq!(
        fs::read_to_string(root.join("VERSION")).unwrap(),
        "warmer-cache 2\n"
    );
}

#[test]
fn gc_over_max_bytes_removes_the_next_entry_when_one_is_busy_and_counts_what_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path().join("c")).unwrap();
    for (i, service) in [(1u8, "busy"), (2, "idle")] {
        let staging = cache.stage().unwrap();
        fs::write(staging.data_dir().join("img"), vec![i; 1000]).unwrap();
        let mut e = made_ago(new_entry(&format!("{i:064x}")), 100 - u64::from(i));
        e.service = service.into();
        cache.publish(staging, e).unwrap();
    }
    let _busy = cache.lock_service("busy", false).unwrap();
    let policy = cache::GcPolicy {
        max_bytes: Some(1000),
        max_age: None,
    };
    // The older (busy) entry is first in line; it stays, so the idle one goes.
    let r = cache.gc(&policy, &|_| true).unwrap();
    assert_eq!(r.skipped.len(), 1, "{r:?}");
    let gone: Vec<_> = r.removed.iter().map(|x| x.key.clone()).collect();
    assert_eq!(gone, vec![format!("{:064x}.1", 2)]);
    assert_eq!(r.kept_bytes, 1000, "the busy entry is still there");
    // A busy stale entry is kept and counted too.
    cache.mark_stale(&format!("{:064x}.1", 1), "test").unwrap();
    let r = cache.gc(&cache::GcPolicy::default(), &|_| true).unwrap();
    assert!(r.removed.is_empty());
    assert_eq!(r.kept_bytes, 1000);
}

#[test]
fn an_entry_made_elsewhere_is_published_only_if_every_file_matches() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, made) = published(&dir);
    let restage = |tamper: bool| {
        let staging = cache.stage().unwrap();
        for f in &made.meta.files {
            let mut bytes = fs::read(made.data_dir().join(&f.path)).unwrap();
            if tamper {
                bytes[0] ^= 1;
            }
            let dest = staging.data_dir().join(&f.path);
            fs::create_dir_all(dest.parent().unwrap()).unwrap();
            fs::write(dest, bytes).unwrap();
        }
        staging
    };
    let elsewhere = |origin: &str| NewEntry {
        origin: Some(origin.into()),
        expected_files: Some(made.meta.files.clone()),
        created: Some((made.meta.created.clone(), made.meta.created_unix)),
        ..new_entry(&made.meta.digest)
    };
    let err = cache
        .publish(restage(true), elsewhere("reg/x@sha256:1"))
        .unwrap_err();
    assert!(
        matches!(
            &err,
            cache::Error::Damaged {
                problem: Problem::Checksum { .. },
                ..
            }
        ),
        "{err:?}"
    );
    let e = cache
        .publish(restage(false), elsewhere("reg/x@sha256:1"))
        .unwrap();
    assert_eq!(e.meta.origin.as_deref(), Some("reg/x@sha256:1"));
    assert_eq!(
        e.meta.created_unix, made.meta.created_unix,
        "the maker's time"
    );
    assert_eq!(e.meta.generation, made.meta.generation + 1);
    cache.verify(&e, &mut |_, _| {}).unwrap();
}

#[test]
fn incoming_downloads_are_private_and_removable() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let d = cache.incoming("abcdef0123456789").unwrap();
    fs::write(d.join("blob.part"), b"partial").unwrap();
    // Kept across opens (a broken pull resumes).
    let cache = Cache::open(dir.path()).unwrap();
    assert!(d.join("blob.part").exists());
    assert!(cache.incoming("../x").is_err());
    cache.drop_incoming("abcdef0123456789").unwrap();
    assert!(!d.exists());
}

#[test]
fn a_note_lives_beside_its_entry_changes_nothing_of_it_and_goes_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, entry) = published(&dir);
    assert_eq!(cache.note(&entry.key, "working-set"), None);
    cache.set_note(&entry.key, "working-set", b"{}").unwrap();
    assert_eq!(cache.note(&entry.key, "working-set").unwrap(), b"{}");
    cache
        .set_note(&entry.key, "restore-history", b"[]")
        .unwrap();
    assert!(cache.remove_note(&entry.key, "restore-history").unwrap());
    assert!(!cache.remove_note(&entry.key, "restore-history").unwrap());
    assert_eq!(cache.note(&entry.key, "restore-history"), None);
    // The entry still has exactly its files and verifies.
    cache.check_shape(&entry).unwrap();
    verify(&cache, DIGEST).unwrap();
    // Names are plain; a note of an entry that is not there is refused.
    assert!(cache.set_note(&entry.key, "../x", b"1").is_err());
    assert!(cache
        .set_note(&format!("{DIGEST}.9"), "working-set", b"1")
        .is_err());
    // A note someone else could have written is not read.
    let path = dir
        .path()
        .join("c/notes")
        .join(&entry.key)
        .join("working-set");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(cache.note(&entry.key, "working-set"), None);
    cache.remove(&entry.key).unwrap();
    assert!(!path.exists());
}
