//! Man pages and shell completions, written from the command line's own
//! definition ([`crate::cli`]) and the manifest key table
//! ([`crate::manifest::keys`]): they cannot say other than `--help`.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

/// The subcommands that take a SERVICE first: their first argument
/// completes from the manifest directory.
const TAKES_SERVICE: &[&str] = &[
    "run",
    "status",
    "checkpoint",
    "rollback",
    "reset",
    "bench",
    "push",
    "pull",
    "export",
    "inspect",
];

/// Writes warmer(1), one page per subcommand, warmer-init(8) and
/// warmer.yaml(5) into `dir`.
pub fn write_man_pages(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let cmd = crate::cli::Cli::command().name("warmer");
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    let top = dir.join("warmer.1");
    std::fs::write(&top, page)?;
    written.push(top);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("warmer-{}", sub.get_name());
        // clap names are &'static str; this runs once per page, in a
        // command that exits right after.
        let title: &'static str = Box::leak(name.clone().into_boxed_str());
        let mut page = Vec::new();
        clap_mangen::Man::new(sub.clone().name(title)).render(&mut page)?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, page)?;
        written.push(path);
    }
    let init = dir.join("warmer-init.8");
    std::fs::write(&init, init_man_page(env!("CARGO_PKG_VERSION")))?;
    written.push(init);
    let yaml = dir.join("warmer.yaml.5");
    std::fs::write(
        &yaml,
        crate::manifest::keys::man_page(env!("CARGO_PKG_VERSION")),
    )?;
    written.push(yaml);
    Ok(written)
}

/// warmer-init(8): not a command anyone runs by hand, but installed in
/// /usr/bin, so it says what it is.
fn init_man_page(version: &str) -> String {
    format!(
        r#".TH WARMER-INIT 8 "" "warmer {version}" "warmer"
.SH NAME
warmer-init \- PID 1 of a service's PID namespace under warmer
.SH SYNOPSIS
\fBwarmer-init\fR \fISERVICE\fR \fIHOME\fR \fB--\fR \fIPROGRAM\fR [\fIARGS\fR...]
.SH DESCRIPTION
\fBwarmer\fR(1) starts every service it warms as a child of \fBwarmer-init\fR,
the first process of a PID namespace of its own: it reaps orphans, passes
signals on to the service, and ends when the service does, with its status.
CRIU checkpoints and restores it with the service, so its bytes are part of
every image's digest; a new release of warmer keeps it byte-identical.
.PP
It is started by \fBwarmer run\fR only; there is nothing to configure.
.SH SEE ALSO
\fBwarmer\fR(1), \fBwarmer.yaml\fR(5), \fBcriu\fR(8)
"#
    )
}

/// The completion script for `shell`: clap's, plus service names.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn Write) -> std::io::Result<()> {
    let mut cmd = crate::cli::Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "warmer", &mut script);
    out.write_all(&script)?;
    let subs = TAKES_SERVICE.join(" ");
    let extra = match shell {
        clap_complete::Shell::Bash => format!(
            r#"
# Service names, from the manifest directory.
_warmer_services() {{
    local d="${{WARMER_MANIFEST_DIR:-/etc/warmer/manifests}}" f
    for f in "$d"/*.yaml "$d"/*.yml; do
        [ -e "$f" ] || continue
        f="${{f##*/}}"; echo "${{f%.*}}"
    done
}}
_warmer_with_services() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" sub="${{COMP_WORDS[1]}}"
    if [ "$COMP_CWORD" -eq 2 ] && [[ "$cur" != -* ]] && [[ " {subs} " == *" $sub "* ]]; then
        COMPREPLY=( $(compgen -W "$(_warmer_services)" -- "$cur") )
        return 0
    fi
    _warmer "$@"
}}
complete -F _warmer_with_services -o bashdefault -o default warmer
"#
        ),
        clap_complete::Shell::Zsh => format!(
            r#"
# Service names, from the manifest directory.
_warmer_services() {{
    local d="${{WARMER_MANIFEST_DIR:-/etc/warmer/manifests}}"
    local -a names; names=($d/*.y(a|)ml(N:t:r))
    compadd -a names
}}
_warmer_with_services() {{
    if (( CURRENT == 3 )) && [[ " {subs} " == *" ${{words[2]}} "* ]] && [[ $PREFIX != -* ]]; then
        _warmer_services
    else
        _warmer "$@"
    fi
}}
compdef _warmer_with_services warmer
"#
        ),
        clap_complete::Shell::Fish => format!(
            r#"
# Service names, from the manifest directory.
function __warmer_services
    set -l d (set -q WARMER_MANIFEST_DIR; and echo $WARMER_MANIFEST_DIR; or echo /etc/warmer/manifests)
    for f in $d/*.yaml $d/*.yml
        basename $f | string replace -r '\.ya?ml$' ''
    end
end
complete -c warmer -n "__fish_seen_subcommand_from {subs}; and test (count (commandline -opc)) -eq 2" -f -a "(__warmer_services)"
"#
        ),
        _ => String::new(),
    };
    out.write_all(extra.as_bytes())
}
