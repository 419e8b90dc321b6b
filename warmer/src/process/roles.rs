//! One binary, three roles, and the contracts between them.
//!
//! ```text
//!  warmer run SVC ──clone(NEWPID)+exec──> warmer-init SVC HOME -- ARGV...   (role 2)
//!       │                                  or `warmer __init SVC HOME -- ARGV...`
//!       └──spawn──> criu dump --action-script <warmer>
//!                        └──exec at each action──> warmer                   (role 3)
//!                              env: WARMER_STATE_HOOK=1, WARMER_STATE_PATHS=[...],
//!                                   CRTOOLS_SCRIPT_ACTION=post-dump, CRTOOLS_IMAGE_DIR=...
//! ```
//!
//! 1. **CLI** (`warmer run|status|...`): everything else.
//! 2. **Namespace init**: the separate `warmer-init` binary (preferred: its
//!    bytes are part of every image, see [`crate::digest`]), or `warmer __init`
//!    when it is not installed. Arguments: `SERVICE HOME -- PROGRAM [ARGS...]`
//!    ([`init_args`] builds them, `init_loop::parse_args` reads them).
//! 3. **CRIU action script**: CRIU 4.2 execs `--action-script` without a shell
//!    or arguments, so the request travels in the environment: warmer's own
//!    [`STATE_HOOK_ENV`]/[`STATE_PATHS_ENV`] (set by the checkpoint, see
//!    [`action_script_env`]) and CRIU's `CRTOOLS_*` variables
//!    (criu/action-scripts.c). Only `post-dump` does anything: the tree is
//!    still frozen, so the state paths are captured at the dump's instant.
//!
//! 4. **Restore guard** (`warmer __guard SERVICE HOME CACHE`): spawned for the
//!    length of a restore; if the `warmer run` that spawned it dies before it
//!    says the restore is over, the guard ends what that run left (CRIU, a
//!    half-restored tree): see [`crate::process::guard`].
//!
//! [`detect`] decides the role from the arguments and environment alone.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

/// `warmer __init ...`: the init role of the `warmer` binary itself.
pub const INIT_ARG: &str = "__init";
/// `warmer __guard SERVICE HOME`: the restore guard.
pub const GUARD_ARG: &str = "__guard";
/// Set to `1` in CRIU's environment by a dump that captures state.
pub const STATE_HOOK_ENV: &str = "WARMER_STATE_HOOK";
/// The state paths to capture, a JSON array of absolute paths.
pub const STATE_PATHS_ENV: &str = "WARMER_STATE_PATHS";
/// Set by CRIU for its action script: which action point this is.
pub const CRIU_ACTION_ENV: &str = "CRTOOLS_SCRIPT_ACTION";
/// Set by CRIU for its action script: the images directory of the dump.
pub const CRIU_IMAGE_DIR_ENV: &str = "CRTOOLS_IMAGE_DIR";
/// The action point at which the tree is dumped and still frozen.
pub const POST_DUMP: &str = "post-dump";
/// A JSON array of directories (the frozen tree's empty tmpfs, through
/// /proc/PID/root) the action script checks are still empty.
pub const EMPTY_TMPFS_ENV: &str = "WARMER_EMPTY_TMPFS";

/// What this process is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Cli,
    /// Run the init loop with these arguments (`SERVICE HOME -- ARGV...`).
    Init(Vec<OsString>),
    /// CRIU runs us as its action script.
    ActionScript(ActionRequest),
    /// Guard a restore of SERVICE (run directory HOME, image cache CACHE).
    Guard {
        service: String,
        home: PathBuf,
        cache: PathBuf,
    },
}

/// What CRIU asks of its action script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionRequest {
    /// `CRTOOLS_SCRIPT_ACTION`: pre-dump, post-dump, pre-restore, ...
    pub action: String,
    pub image_dir: Option<PathBuf>,
    /// The raw `WARMER_STATE_PATHS` value.
    pub state_paths: Option<String>,
    /// The raw `WARMER_EMPTY_TMPFS` value: directories that must still be
    /// empty at `post-dump`.
    pub empty_tmpfs: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActionError {
    #[error("{CRIU_IMAGE_DIR_ENV} is not set")]
    NoImageDir,
    #[error("{STATE_PATHS_ENV} is not set")]
    NoPaths,
    #[error("{STATE_PATHS_ENV} is not a JSON array of paths: {0}")]
    BadPaths(String),
}

impl ActionRequest {
    /// Whether this action point is the one that captures state.
    pub fn captures_state(&self) -> bool {
        self.action == POST_DUMP
    }

    /// The images directory and the paths to capture.
    pub fn capture_plan(&self) -> Result<(PathBuf, Vec<PathBuf>), ActionError> {
        let dir = self.image_dir.clone().ok_or(ActionError::NoImageDir)?;
        let raw = self.state_paths.as_deref().ok_or(ActionError::NoPaths)?;
        let paths: Vec<PathBuf> =
            serde_json::from_str(raw).map_err(|e| ActionError::BadPaths(e.to_string()))?;
        Ok((dir, paths))
    }
}

/// The role of a process with arguments `args` (without argv\[0\]) and
/// environment `env`.
pub fn detect(args: &[OsString], env: &dyn Fn(&str) -> Option<OsString>) -> Role {
    if args.first().is_some_and(|a| a == INIT_ARG) {
        return Role::Init(args[1..].to_vec());
    }
    if let [flag, service, home, cache] = args {
        if flag == GUARD_ARG {
            return Role::Guard {
                service: service.to_string_lossy().into_owned(),
                home: PathBuf::from(home),
                cache: PathBuf::from(cache),
            };
        }
    }
    let hook = env(STATE_HOOK_ENV).is_some_and(|v| v == "1");
    match (hook, env(CRIU_ACTION_ENV)) {
        (true, Some(action)) => Role::ActionScript(ActionRequest {
            action: action.to_string_lossy().into_owned(),
            image_dir: env(CRIU_IMAGE_DIR_ENV).map(PathBuf::from),
            state_paths: env(STATE_PATHS_ENV).map(|v| v.to_string_lossy().into_owned()),
            empty_tmpfs: env(EMPTY_TMPFS_ENV).map(|v| v.to_string_lossy().into_owned()),
        }),
        _ => Role::Cli,
    }
}

/// The role of this process.
pub fn this_process() -> Role {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    detect(&args, &|k| std::env::var_os(k))
}

/// The environment a dump sets on CRIU so that its action script (warmer)
/// captures `paths` at `post-dump`.
pub fn action_script_env(paths: &[PathBuf]) -> Vec<(&'static str, String)> {
    vec![
        (STATE_HOOK_ENV, "1".to_string()),
        (
            STATE_PATHS_ENV,
            serde_json::to_string(paths).expect("paths serialize"),
        ),
    ]
}

/// The environment that has the action script check, frozen, that the
/// tmpfs a dump treats as empty external mounts are still empty.
pub fn empty_tmpfs_env(dirs: &[PathBuf]) -> Vec<(&'static str, String)> {
    vec![(
        EMPTY_TMPFS_ENV,
        serde_json::to_string(dirs).expect("paths serialize"),
    )]
}

impl ActionRequest {
    /// The directories that must be empty at `post-dump`.
    pub fn empty_dirs(&self) -> Result<Vec<PathBuf>, ActionError> {
        match self.empty_tmpfs.as_deref() {
            None | Some("") => Ok(Vec::new()),
            Some(raw) => {
                serde_json::from_str(raw).map_err(|e| ActionError::BadPaths(e.to_string()))
            }
        }
    }
}

/// The init's arguments after argv\[0\]: `[prefix...] SERVICE HOME -- ARGV...`.
pub fn init_args(prefix: &[String], service: &str, home: &Path, argv: &[String]) -> Vec<OsString> {
    let mut a: Vec<OsString> = prefix.iter().map(OsString::from).collect();
    a.push(service.into());
    a.push(home.into());
    a.push("--".into());
    a.extend(argv.iter().map(|s| OsStr::new(s).to_os_string()));
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: BTreeMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn the_cli_is_the_default() {
        assert_eq!(
            detect(&["run".into(), "web".into()], &env_of(&[])),
            Role::Cli
        );
        // CRIU's variables alone (warmer run from inside some other action
        // script) do not make warmer a hook.
        let env = env_of(&[(CRIU_ACTION_ENV, POST_DUMP)]);
        assert_eq!(detect(&["status".into()], &env), Role::Cli);
    }

    #[test]
    fn init_role_takes_the_rest_of_the_arguments() {
        let home = Path::new("/run/warmer/web");
        let mut args = init_args(
            &[INIT_ARG.into()],
            "web",
            home,
            &["/bin/app".into(), "-x".into()],
        );
        let Role::Init(rest) = detect(&args, &env_of(&[])) else {
            panic!("not init")
        };
        assert_eq!(rest, args.split_off(1));
        let parsed = crate::process::init_loop::parse_args(&rest).unwrap();
        assert_eq!(parsed.home, home.as_os_str());
        assert_eq!(parsed.argv, vec![OsString::from("/bin/app"), "-x".into()]);
    }

    #[test]
    fn the_action_script_contract_round_trips() {
        let paths = vec![PathBuf::from("/var/lib/app"), PathBuf::from("/dev/shm/x")];
        let mut pairs: Vec<(&str, String)> = action_script_env(&paths);
        pairs.push((CRIU_ACTION_ENV, POST_DUMP.into()));
        pairs.push((CRIU_IMAGE_DIR_ENV, "/c/tmp/stage/data".into()));
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let Role::ActionScript(req) = detect(&[], &env_of(&pairs)) else {
            panic!("not the action script")
        };
        assert!(req.captures_state());
        assert_eq!(
            req.capture_plan().unwrap(),
            (PathBuf::from("/c/tmp/stage/data"), paths)
        );
    }

    #[test]
    fn other_action_points_capture_nothing_and_bad_requests_are_named() {
        let req = ActionRequest {
            action: "pre-dump".into(),
            image_dir: None,
            state_paths: None,
            empty_tmpfs: None,
        };
        assert!(!req.captures_state());
        assert_eq!(req.capture_plan(), Err(ActionError::NoImageDir));
        let req = ActionRequest {
            action: POST_DUMP.into(),
            image_dir: Some("/x".into()),
            state_paths: Some("{not json".into()),
            empty_tmpfs: Some("[\"/proc/7/root/tmp\"]".into()),
        };
        assert!(matches!(req.capture_plan(), Err(ActionError::BadPaths(_))));
        assert_eq!(
            req.empty_dirs(),
            Ok(vec![std::path::PathBuf::from("/proc/7/root/tmp")])
        );
    }
}
