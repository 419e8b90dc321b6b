//! Every manifest key, once: what it takes, its default, what it does. The
//! man page `warmer.yaml(5)` is written from this table, and tests check it
//! against the parser (each key's example parses) and against the README's
//! manifest example (each key is there, and nothing else), so the three
//! cannot drift.

/// One key of a manifest.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// Dotted path: `ready.timeout`.
    pub path: &'static str,
    /// What it takes.
    pub kind: &'static str,
    /// Its default, or "required" / "none".
    pub default: &'static str,
    pub doc: &'static str,
    /// A YAML value that parses (used by the tests).
    pub example: &'static str,
}

/// Every key, in the README's order.
pub const KEYS: &[Key] = &[
    Key { path: "exec", kind: "list of strings", default: "required", doc: "The service's argv. exec[0] and every argument that names an existing script, jar or configuration file are digest inputs.", example: "[\"/usr/bin/python3\", \"/srv/app/server.py\"]" },
    Key { path: "workdir", kind: "absolute path", default: "warmer's run directory", doc: "The service's working directory.", example: "/srv/app" },
    Key { path: "pid_file", kind: "absolute path", default: "none", doc: "warmer writes the service's host PID here once it is ready, cold or restored, for the host's tools; removed at stop.", example: "/run/app/app.pid" },
    Key { path: "env", kind: "map of strings", default: "none", doc: "Added to warmer's environment for the service.", example: "{APP_MODE: prod}" },
    Key { path: "env_file", kind: "list of absolute paths (- in front: may be missing)", default: "none", doc: "KEY=VALUE files read into the service's environment at every start, after env (EnvironmentFile=); their values stay out of the manifest and the image's metadata, their hashes are digest inputs. Owned by root and writable by no one else.", example: "[\"-/etc/default/app\"]" },
    Key { path: "ready.http", kind: "http URL", default: "one probe required", doc: "Ready when a GET answers 2xx.", example: "\"http://127.0.0.1:8080/health\"" },
    Key { path: "ready.tcp", kind: "host:port", default: "one probe required", doc: "Ready when a connection succeeds (closed with a reset).", example: "\"127.0.0.1:8080\"" },
    Key { path: "ready.exec", kind: "list of strings", default: "one probe required", doc: "Ready when the command exits 0 (run in a process group of its own).", example: "[\"/bin/true\"]" },
    Key { path: "ready.notify", kind: "boolean", default: "one probe required", doc: "Ready when the service sends READY=1 to $NOTIFY_SOCKET.", example: "true" },
    Key { path: "ready.timeout", kind: "duration", default: "60s", doc: "The service must be ready within this (at most a week, as every duration).", example: "60s" },
    Key { path: "checkpoint.settle", kind: "duration", default: "500ms", doc: "Wait after ready before the checkpoint.", example: "500ms" },
    Key { path: "checkpoint.enabled", kind: "boolean", default: "true", doc: "false: always cold start, never checkpoint.", example: "true" },
    Key { path: "checkpoint.tcp_established", kind: "boolean", default: "false", doc: "Also dump established TCP connections (the service's own: a broker, a database).", example: "false" },
    Key { path: "checkpoint.timeout", kind: "duration", default: "5m", doc: "A dump taking longer is killed; the service keeps running.", example: "5m" },
    Key { path: "checkpoint.forbid_env", kind: "list of names (* matches)", default: "none", doc: "No checkpoint while a process of the service has such an environment variable.", example: "[\"*TOKEN*\"]" },
    Key { path: "digest.files", kind: "list of paths", default: "none", doc: "More digest inputs (files or directories).", example: "[\"/srv/app/server.py\"]" },
    Key { path: "stop.timeout", kind: "duration", default: "10s", doc: "SIGTERM, then SIGKILL after this long; a persist stop's dump is bounded by it too.", example: "10s" },
    Key { path: "cache.keep", kind: "number", default: "2", doc: "Image generations kept for this service.", example: "2" },
    Key { path: "hooks.before_checkpoint", kind: "list of strings", default: "none", doc: "Run before every checkpoint, inside the service's namespaces with its environment; failing: no checkpoint.", example: "[\"/bin/true\"]" },
    Key { path: "hooks.after_restore", kind: "list of strings", default: "none", doc: "Run after CRIU restored the service, before the probe; failing: the restore is undone, cold start.", example: "[\"/bin/true\"]" },
    Key { path: "hooks.timeout", kind: "duration", default: "30s", doc: "Each hook must end within this; it is killed with everything it started.", example: "30s" },
    Key { path: "user", kind: "user name or number", default: "root", doc: "The user the service runs as (systemd's User=); with it or any sandbox key the service runs in namespaces of its own.", example: "nobody" },
    Key { path: "group", kind: "group name or number", default: "the user's primary group", doc: "The service's group (Group=).", example: "nogroup" },
    Key { path: "supplementary_groups", kind: "list of groups", default: "the user's groups", doc: "Groups added to the user's own (SupplementaryGroups=).", example: "[adm]" },
    Key { path: "exec_start_pre", kind: "list of argv lists", default: "none", doc: "Run before each cold start, in order (ExecStartPre=): as the service runs, or with + in front of the program as root outside the sandbox; - in front: a failure is ignored.", example: "[[\"+/bin/true\"], [\"/bin/true\"]]" },
    Key { path: "sandbox.private_tmp", kind: "boolean", default: "false", doc: "A /tmp and /var/tmp of its own, kept in the image (PrivateTmp=).", example: "true" },
    Key { path: "sandbox.protect_system", kind: "false | true | full | strict", default: "false", doc: "Read-only /usr, /boot, /efi; full: and /etc; strict: everything but /dev, /proc, /sys, the private /tmp, read_write_paths and the service's directories (ProtectSystem=).", example: "strict" },
    Key { path: "sandbox.protect_home", kind: "false | true | read-only | tmpfs", default: "false", doc: "/home, /root and /run/user inaccessible, read-only or an empty tmpfs (ProtectHome=).", example: "true" },
    Key { path: "sandbox.read_write_paths", kind: "list of absolute paths", default: "none", doc: "Writable even under protect_system: strict (ReadWritePaths=).", example: "[/var/lib/app]" },
    Key { path: "sandbox.read_only_paths", kind: "list of absolute paths", default: "none", doc: "Read-only (ReadOnlyPaths=).", example: "[/etc]" },
    Key { path: "sandbox.inaccessible_paths", kind: "list of absolute paths", default: "none", doc: "Directories hidden under an empty, inaccessible tmpfs (InaccessiblePaths=).", example: "[/srv]" },
    Key { path: "sandbox.no_new_privileges", kind: "boolean", default: "false", doc: "No privileges gained through execve: setuid programs, file capabilities (NoNewPrivileges=).", example: "true" },
    Key { path: "sandbox.ambient_capabilities", kind: "list of capability names", default: "none", doc: "Capabilities a service with a user keeps (AmbientCapabilities=); they act on what its own user namespace holds.", example: "[CAP_NET_BIND_SERVICE]" },
    Key { path: "sandbox.capability_bounding_set", kind: "list of capability names (~ in front: all but)", default: "all", doc: "The capabilities the service and its children may ever have (CapabilityBoundingSet=).", example: "[CAP_NET_BIND_SERVICE]" },
    Key { path: "sandbox.umask", kind: "octal string", default: "warmer's", doc: "The file mode creation mask (UMask=).", example: "\"0027\"" },
    Key { path: "sandbox.runtime_directory", kind: "list of names", default: "none", doc: "Directories under /run made and owned by the user and writable in the sandbox (RuntimeDirectory=); kept across stops, since a restored service expects its files there.", example: "[app]" },
    Key { path: "sandbox.state_directory", kind: "list of names", default: "none", doc: "The same under /var/lib (StateDirectory=).", example: "[app]" },
    Key { path: "sandbox.cache_directory", kind: "list of names", default: "none", doc: "The same under /var/cache (CacheDirectory=).", example: "[app]" },
    Key { path: "sandbox.logs_directory", kind: "list of names", default: "none", doc: "The same under /var/log (LogsDirectory=).", example: "[app]" },
    Key { path: "sandbox.limit_nofile", kind: "number, SOFT:HARD or infinity", default: "warmer's", doc: "RLIMIT_NOFILE (LimitNOFILE=); likewise limit_nproc, limit_core, limit_memlock, limit_stack, limit_as, limit_fsize, limit_data. Raising a hard limit above warmer's needs CAP_SYS_RESOURCE.", example: "\"1024:4096\"" },
    Key { path: "sandbox.limit_nproc", kind: "number, SOFT:HARD or infinity", default: "warmer's", doc: "RLIMIT_NPROC (LimitNPROC=).", example: "infinity" },
    Key { path: "sandbox.limit_core", kind: "number, SOFT:HARD or infinity", default: "warmer's", doc: "RLIMIT_CORE (LimitCORE=).", example: "0" },
    Key { path: "sandbox.limit_memlock", kind: "number, SOFT:HARD or infinity", default: "warmer's", doc: "RLIMIT_MEMLOCK (LimitMEMLOCK=).", example: "65536" },
    Key { path: "sandbox.limit_stack", kind: "number, SOFT:HARD or infinity", default: "warmer's", doc: "RLIMIT_STACK (LimitSTACK=).", example: "8388608" },
    Key { path: "sandbox.limit_as", kind: "number, SOFT:HARD or infinity", default: "warmer's", doc: "RLIMIT_AS (LimitAS=).", example: "infinity" },
    Key { path: "sandbox.limit_fsize", kind: "number, SOFT:HARD or infinity", default: "warmer's", doc: "RLIMIT_FSIZE (LimitFSIZE=).", example: "infinity" },
    Key { path: "sandbox.limit_data", kind: "number, SOFT:HARD or infinity", default: "warmer's", doc: "RLIMIT_DATA (LimitDATA=).", example: "infinity" },
    Key { path: "state", kind: "list of absolute paths", default: "none", doc: "On-disk data captured with the image and fingerprinted; an image is never restored once it changed.", example: "[\"/var/lib/app/data\"]" },
    Key { path: "not_state", kind: "list of absolute paths", default: "none", doc: "Written, but not state (logs outside /var/log): files the image holds open for writing are state unless listed here.", example: "[\"/srv/app/logs\"]" },
    Key { path: "mode", kind: "warm | persist", default: "warm", doc: "persist: checkpoint at every stop, restore that once.", example: "warm" },
    Key { path: "restore.mode", kind: "auto | eager | lazy", default: "auto", doc: "How memory is restored (lazy: on demand, userfaultfd).", example: "auto" },
    Key { path: "restore.lazy", kind: "boolean", default: "none", doc: "Older spelling: true means restore.mode: lazy, false eager.", example: "true" },
    Key { path: "restore.timeout", kind: "duration", default: "60s", doc: "CRIU must have restored the tree within this.", example: "60s" },
    Key { path: "restore.signal", kind: "signal name", default: "none", doc: "Sent to the main process after each restore, before the probe.", example: "SIGUSR2" },
    Key { path: "remote.repository", kind: "host[:port]/path", default: "required with remote", doc: "The registry repository images are tagged into with their digest.", example: "registry.example:5000/warmer/web" },
    Key { path: "remote.push", kind: "boolean", default: "false", doc: "Push each new image after its checkpoint, in the background.", example: "false" },
    Key { path: "remote.insecure", kind: "boolean", default: "false", doc: "Plain HTTP to this registry (test registries only).", example: "false" },
    Key { path: "remote.timeout", kind: "duration", default: "5s", doc: "A start waits at most this long for a pull.", example: "5s" },
    Key { path: "remote.ca_file", kind: "absolute path", default: "none", doc: "A CA certificate (PEM) trusted for this registry besides the system's.", example: "/etc/warmer/registry-ca.pem" },
    Key { path: "remote.sign", kind: "absolute path", default: "trust.yaml's sign:", doc: "The private key this node signs what it pushes with (warmer keygen).", example: "/etc/warmer/node.key" },
    Key { path: "remote.verify", kind: "list of absolute paths", default: "trust.yaml's verify:", doc: "A pulled or imported image is used only if signed by one of these public keys; with none, nothing is pulled.", example: "[/etc/warmer/ops.pub]" },
];

fn roff_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('-', "\\-")
}

/// `warmer.yaml(5)`, in roff.
pub fn man_page(version: &str) -> String {
    let mut out = format!(
        ".TH WARMER.YAML 5 \"\" \"warmer {version}\" \"File Formats\"\n\
         .SH NAME\nwarmer.yaml \\- a service manifest for warmer\n\
         .SH SYNOPSIS\n/etc/warmer/manifests/\\fISERVICE\\fR.yaml\n\
         .SH DESCRIPTION\nOne YAML file per service; the file stem is the service name. Unknown keys, \
         wrong types and out-of-range values are refused with FILE:LINE:COL. Durations are \
         humantime (500ms, 30s, 2m) and at most a week. See warmer(1).\n.SH KEYS\n"
    );
    for k in KEYS {
        out.push_str(&format!(
            ".TP\n.B {}\n{} (default: {}). {}\n",
            roff_escape(k.path),
            roff_escape(k.kind),
            roff_escape(k.default),
            roff_escape(k.doc)
        ));
    }
    out.push_str(".SH SEE ALSO\nwarmer(1)\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest with `key` set to its example (and whatever else it needs).
    fn with(key: &Key) -> String {
        let base_ready = if key.path.starts_with("ready.") && key.path != "ready.timeout" {
            String::new()
        } else {
            "  tcp: \"h:1\"\n".to_string()
        };
        let (section, leaf) = key.path.split_once('.').unwrap_or((key.path, ""));
        let mut text = String::new();
        if key.path != "exec" {
            text.push_str("exec: [a]\n");
        }
        if section == "ready" {
            text.push_str(&format!("ready:\n{base_ready}  {leaf}: {}\n", key.example));
            return text;
        }
        text.push_str("ready:\n  tcp: \"h:1\"\n");
        match (section, leaf) {
            (s, "") => text.push_str(&format!("{s}: {}\n", key.example)),
            ("remote", "repository") => {
                text.push_str(&format!("remote:\n  repository: {}\n", key.example))
            }
            ("remote", l) => text.push_str(&format!(
                "remote:\n  repository: registry.example:5000/w/x\n  {l}: {}\n",
                key.example
            )),
            (s, l) => text.push_str(&format!("{s}:\n  {l}: {}\n", key.example)),
        }
        text
    }

    #[test]
    fn every_key_in_the_table_parses_with_its_example() {
        for k in KEYS {
            let text = with(k);
            if let Err(e) =
                crate::manifest::Manifest::parse("web", std::path::Path::new("web.yaml"), &text)
            {
                panic!("{}: {e}\n{text}", k.path);
            }
        }
    }

    #[test]
    fn the_man_page_names_every_key() {
        let page = man_page("1.0");
        for k in KEYS {
            assert!(page.contains(&roff_escape(k.path)), "{}", k.path);
        }
        assert!(page.starts_with(".TH WARMER.YAML 5"));
    }
}
