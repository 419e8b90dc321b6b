//! The manifest's user and group names as numbers, remembered while the
//! files they come from stay the same.
//!
//! A lookup goes through NSS (`getpwnam`, `getgrouplist`): its first call in
//! a process loads the NSS modules, and `getgrouplist` asks every module of
//! the `group` line, nss-systemd's varlink services included, so a lookup
//! costs 0.2-1 ms, and one restore of a sandboxed service asked for the same
//! names three times (its digest, its directories, its hooks). The answer
//! is kept for the life of the process and, through the run directory's
//! memo ([`crate::memo`]), for the boot; it is asked again as soon as
//! `/etc/passwd`, `/etc/group` or `/etc/nsswitch.conf` is another file or
//! was written since (a `useradd` or `usermod` between two restarts of a
//! long-lived `warmer run` is seen at the next one).

use std::path::Path;
use std::sync::Mutex;

use cache::fsutil::FileIdentity;

use super::SandboxError;
use crate::manifest::Sandbox;
use crate::memo::Memo;

/// uid, gid, supplementary groups (sorted).
pub type Ids = (u32, u32, Vec<u32>);

/// What a lookup depends on in the manifest.
type Names = (Option<String>, Option<String>, Vec<String>);

/// What the answers are drawn from.
const FILES: [&str; 3] = ["/etc/passwd", "/etc/group", "/etc/nsswitch.conf"];

type FileIds = [FileIdentity; 3];

struct Answers {
    files: FileIds,
    answers: Vec<(Names, Ids)>,
}

static ANSWERS: Mutex<Option<Answers>> = Mutex::new(None);

fn files_now() -> Option<FileIds> {
    let [a, b, c] = FILES.map(|f| FileIdentity::of_path(Path::new(f)));
    Some([a?, b?, c?])
}

/// `s`'s ids: remembered in this process or in `memo`, or asked of
/// `look_up` (and remembered when the files could be identified).
pub fn lookup(
    s: &Sandbox,
    memo: Option<&mut Memo>,
    look_up: impl Fn(&Sandbox) -> Result<Ids, SandboxError>,
) -> Result<Ids, SandboxError> {
    let names: Names = (
        s.user.clone(),
        s.group.clone(),
        s.supplementary_groups.clone(),
    );
    let kind = format!("ids {names:?}");
    remembered(&ANSWERS, names, files_now(), || match memo {
        None => look_up(s),
        Some(memo) => {
            let files = FILES.map(Path::new);
            let mut looked_up = None;
            let text = memo.get_all(&kind, &files, || {
                let ids = look_up(s)?;
                let text = to_text(&ids);
                looked_up = Some(ids);
                Ok::<_, SandboxError>(text)
            })?;
            match looked_up.or_else(|| from_text(&text)) {
                Some(ids) => Ok(ids),
                None => look_up(s),
            }
        }
    })
}

/// `uid gid g1,g2,...` as the memo keeps it.
fn to_text((uid, gid, groups): &Ids) -> String {
    let groups: Vec<String> = groups.iter().map(u32::to_string).collect();
    format!("{uid} {gid} {}", groups.join(","))
}

fn from_text(text: &str) -> Option<Ids> {
    let mut parts = text.split(' ');
    let uid = parts.next()?.parse().ok()?;
    let gid = parts.next()?.parse().ok()?;
    let groups = match parts.next()? {
        "" => Vec::new(),
        g => g
            .split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?,
    };
    parts.next().is_none().then_some((uid, gid, groups))
}

fn remembered(
    memo: &Mutex<Option<Answers>>,
    names: Names,
    files: Option<FileIds>,
    look_up: impl FnOnce() -> Result<Ids, SandboxError>,
) -> Result<Ids, SandboxError> {
    let Some(files) = files else {
        return look_up();
    };
    {
        let memo = memo.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = memo.as_ref().filter(|m| m.files == files) {
            if let Some((_, ids)) = m.answers.iter().find(|(n, _)| *n == names) {
                return Ok(ids.clone());
            }
        }
    }
    let ids = look_up()?;
    let mut memo = memo.lock().unwrap_or_else(|e| e.into_inner());
    let m = memo.get_or_insert_with(|| Answers {
        files: files.clone(),
        answers: Vec::new(),
    });
    if m.files != files {
        *m = Answers {
            files,
            answers: Vec::new(),
        };
    }
    m.answers.push((names, ids.clone()));
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(user: &str) -> Names {
        (Some(user.to_string()), None, Vec::new())
    }

    fn files(mtime_ns: i128) -> FileIds {
        let id = |ino| FileIdentity {
            dev: 1,
            ino,
            size: 10,
            mtime_ns,
            ctime_ns: mtime_ns,
            uid: 0,
            mode: 0o644,
        };
        [id(1), id(2), id(3)]
    }

    #[test]
    fn ids_read_back_as_written() {
        for ids in [(101, 101, vec![101, 4, 27]), (0, 0, vec![])] {
            assert_eq!(from_text(&to_text(&ids)), Some(ids));
        }
        assert_eq!(from_text("1 2"), None);
        assert_eq!(from_text("1 2 x"), None);
        assert_eq!(from_text("1 2 3 4"), None);
    }

    #[test]
    fn an_answer_is_kept_while_the_files_stay_the_same_and_asked_again_when_they_change() {
        let memo = Mutex::new(None);
        let a = files(5);
        let asked = std::cell::Cell::new(0);
        let look = |ids: Ids| {
            let asked = &asked;
            move || {
                asked.set(asked.get() + 1);
                Ok(ids)
            }
        };
        let first = remembered(
            &memo,
            names("web"),
            Some(a.clone()),
            look((101, 101, vec![101])),
        );
        assert_eq!(first.unwrap(), (101, 101, vec![101]));
        let again = remembered(&memo, names("web"), Some(a.clone()), look((7, 7, vec![])));
        assert_eq!(again.unwrap(), (101, 101, vec![101]), "kept");
        assert_eq!(asked.get(), 1);

        // /etc/passwd written since (its mtime moved): asked again.
        let b = files(6);
        let changed = remembered(
            &memo,
            names("web"),
            Some(b.clone()),
            look((102, 102, vec![])),
        );
        assert_eq!(changed.unwrap(), (102, 102, vec![]));
        assert_eq!(asked.get(), 2);

        // Files that cannot be identified: never kept.
        let _ = remembered(&memo, names("web"), None, look((103, 103, vec![])));
        let _ = remembered(&memo, names("web"), None, look((103, 103, vec![])));
        assert_eq!(asked.get(), 4);

        // A failed lookup is not kept.
        let failed = remembered(&memo, names("gone"), Some(b.clone()), || {
            Err(SandboxError::NoUser("gone".into()))
        });
        assert!(failed.is_err());
        let later = remembered(
            &memo,
            names("gone"),
            Some(b.clone()),
            look((104, 104, vec![])),
        );
        assert_eq!(later.unwrap(), (104, 104, vec![]));
    }
}
