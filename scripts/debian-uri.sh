#!/usr/bin/env bash
# Prints the URI of the Debian archive this machine's apt is configured for
# (deb822 .sources or one-line .list format), so scripts fetch from the same
# mirror the machine already uses and no host name is written into the repo.
set -euo pipefail

# The URIs of the machine's Debian archive: the first source (deb822 or one-line format)
# whose suite is a plain Debian release (not -security, not a third-party archive).
debian_uri() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk '
      BEGIN { RS=""; FS="\n" }
      {
        uris=""; suites=""
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/)   { uris = $i;   sub(/^URIs:[ \t]*/, "", uris) }
          if ($i ~ /^Suites:/) { suites = $i; sub(/^Suites:[ \t]*/, "", suites) }
        }
        if (uris != "" && suites ~ /(^| )(bookworm|trixie|forky|sid|stable|testing|unstable)( |$)/) {
          split(uris, u, " "); print u[1]; exit
        }
      }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1 == "deb" {
           uri=""; suite=""
           for (i = 2; i <= NF; i++) { if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; continue }
                                       if (uri == "") { uri = $i; continue } suite = $i; break }
           if (suite ~ /^(bookworm|trixie|forky|sid|stable|testing|unstable)$/) { print uri; exit }
         }' "$f"
  done
}
uri=$(debian_uri | head -n1)
if [ -z "$uri" ]; then
  echo "debian-uri: no Debian archive found in /etc/apt/sources.list{,.d}" >&2
  exit 1
fi
echo "${uri%/}"
