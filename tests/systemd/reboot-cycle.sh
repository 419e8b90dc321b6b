#!/usr/bin/env bash
# warmer under a real systemd (PID 1 of a systemd-nspawn container booted from
# a Debian rootfs), through the life an operator gives it:
#
#   enable -> boot: cold start + checkpoint
#   reboot -> restored from the cache (the in-memory nonce from before the
#             reboot proves it), journal shows the service's output after the
#             restore, systemctl status says "restored"; warmer's own entries
#             carry SERVICE=, DIGEST=, PHASE=, READY_MS= fields
#   warmer-verify.service checked the image at boot
#   stop   -> nothing left running, clean result
#   start / restart / kill -> the same on a restored service
#   change the service's program -> next boot cold-starts
#   persist mode (examples/ledger, fsync'd writes in a state: dir):
#     writes, reboot -> restored with the same memory and every write; the
#     generated drop-in orders it before its data's mount goes away;
#     systemctl kill -s KILL -> restarted cold, on the current data
#   a sandboxed service (as nobody, private /tmp, read-only system):
#     restored after the reboot with its memory, as nobody
#   warmer adopt UNIT --enable on an installed unit: systemctl start/restart
#     run it through warmer (cold, then restored), a reboot restores it,
#     warmer unadopt leaves `systemctl cat UNIT` as it was
#   Debian's tomcat10, prometheus and postgresql@15-main adopted --enable as
#     installed: systemctl restart runs them through warmer, then restores
#     them; a reboot restores them (postgres with its committed row);
#     unadopt leaves each unit as its package shipped it
#   all of it on warmer and CRIU as installed by apt from their .debs
#     (scripts/package.sh); man pages, completion of service names; apt purge
#     leaves no file of either, no image, no dangling unit symlink, and gives
#     an adopted unit back as shipped
#
# Needs root, systemd-nspawn and debootstrap (scripts/deps.sh installs them).
# It never skips: if the container cannot boot, it fails and says why.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=${WARMER_NSPAWN_ROOTFS:-/var/cache/warmer-build/nspawn-bookworm}
LOG=$(mktemp -d /tmp/warmer-systemd-test.XXXXXX)
SVC=warmer@slowweb.service
PASS=0
FAIL=0
NSPAWN=
LEADER=

say() { echo "systemd-test: $*" >&2; }

diagnostics() {
  say "---- journal of $SVC (this boot) ----"
  [ -n "$LEADER" ] && in_ct journalctl -u "$SVC" -b --no-pager 2>/dev/null | tail -n 60 >&2 || true
  say "---- container console (tail) ----"
  tail -n 30 "$LOG/console.log" >&2 || true
  say "logs: $LOG"
}

fatal() {
  say "FATAL: $*"
  diagnostics
  shutdown_ct
  exit 1
}

check() {
  local what=$1
  shift
  if "$@"; then
    PASS=$((PASS + 1))
    say "ok   $what"
  else
    FAIL=$((FAIL + 1))
    say "FAIL $what"
    diagnostics
  fi
}

in_ct() { nsenter -t "$LEADER" -a -- "$@"; }

# container_init NSPAWN_PID: the container's PID 1 (systemd) as seen here.
container_init() {
  local p
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [ "$(awk '/^PPid:/ {print $2}' "/proc/$p/status" 2>/dev/null)" = "$1" ] || continue
    if awk '/^NSpid:/ {exit !($NF == 1)}' "/proc/$p/status" 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

# The host's /dev/userfaultfd, as a machine's own /dev has it (nspawn's does
# not): the sandboxed service's restore gets its userfaultfd through it.
UFFD_DEV=()
[ -c /dev/userfaultfd ] && UFFD_DEV=(--bind=/dev/userfaultfd)
boot() {
  SYSTEMD_SECCOMP=0 SYSTEMD_NSPAWN_API_VFS_WRITABLE=1 setsid systemd-nspawn -q -D "$ROOT" \
    --boot --register=no --keep-unit --capability=CAP_NET_ADMIN,CAP_SYS_TIME "${UFFD_DEV[@]}" \
    </dev/null >>"$LOG/console.log" 2>&1 &
  NSPAWN=$!
  LEADER=
  for _ in $(seq 1 200); do
    LEADER=$(container_init "$NSPAWN" || true)
    [ -n "$LEADER" ] && break
    kill -0 "$NSPAWN" 2>/dev/null || fatal "systemd-nspawn exited at boot"
    sleep 0.1
  done
  [ -n "$LEADER" ] || fatal "no container init after 20 s"
  local state
  state=$(timeout 90 nsenter -t "$LEADER" -a -- systemctl is-system-running --wait 2>/dev/null || true)
  say "booted (container init pid $LEADER): system $state"
}

shutdown_ct() {
  [ -n "$NSPAWN" ] && kill -0 "$NSPAWN" 2>/dev/null || return 0
  kill -TERM "$NSPAWN" 2>/dev/null || true
  for _ in $(seq 1 300); do
    kill -0 "$NSPAWN" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$NSPAWN" 2>/dev/null || true
}
trap shutdown_ct EXIT

reboot_ct() {
  in_ct systemctl start --job-mode=replace-irreversibly --no-block reboot.target || true
  local rc=0
  wait "$NSPAWN" || rc=$?
  # systemd-nspawn exits 133 when the container asks for a reboot.
  [ "$rc" = 133 ] || fatal "expected systemd-nspawn to exit 133 on reboot, got $rc"
  boot
}

status_of() {
  in_ct /usr/bin/warmer status "$1" --json 2>/dev/null |
    python3 -c "import json,sys; v=json.load(sys.stdin)[0]; r=eval('v'+sys.argv[1]); print('' if r is None else r)" "$2"
}
status_field() { status_of slowweb "$1"; }

# wait_until SECONDS CMD...: polls CMD until it succeeds.
wait_until() {
  local limit=$1
  shift
  local end=$((SECONDS + limit))
  while [ $SECONDS -lt $end ]; do
    "$@" && return 0
    sleep 0.2
  done
  return 1
}

is_active() { [ "$(in_ct systemctl is-active "$SVC" 2>/dev/null)" = active ]; }
is_inactive() { [ "$(in_ct systemctl is-active "$SVC" 2>/dev/null)" != active ]; }
has_image() { [ -n "$(status_field "['image']")" ] && [ "$(status_field "['state']")" = ready ]; }
nonce() { in_ct curl -fs http://127.0.0.1:8080/state | python3 -c "import json,sys; print(json.load(sys.stdin)['nonce'])"; }
nothing_left() { ! in_ct pgrep -f 'slowweb/server.py --port 8080' >/dev/null; }
started_as() { [ "$(status_field "['last_start']")" = "$1" ]; }

# ---------------------------------------------------------------- setup
tests/systemd/rootfs.sh "$ROOT"
# warmer as an operator installs it: its Debian packages (scripts/package.sh,
# lintian-clean), with apt, which fetches their dependencies from the archive.
scripts/package.sh >/dev/null
in_rootfs() { SYSTEMD_SECCOMP=0 systemd-nspawn -q -D "$ROOT" --register=no --keep-unit --bind-ro="$PWD/target/debian:/mnt/debs" "$@"; }
in_rootfs dpkg --purge warmer >/dev/null 2>&1 || true # left by an earlier, failed run
in_rootfs apt-get update -qq >/dev/null
# As if an earlier warmer with other image and cache formats had been installed.
mkdir -p "$ROOT/var/lib/warmer"
echo "image format 0 cache format 0" >"$ROOT/var/lib/warmer/image-format"
in_rootfs env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  "/mnt/debs/$(basename target/debian/criu_*.deb)" "/mnt/debs/$(basename target/debian/warmer_*.deb)" \
  >"$LOG/apt-install.log" 2>&1 ||
  { tail -n 20 "$LOG/apt-install.log" >&2; fatal "apt could not install the packages"; }
check "package: an upgrade across image formats says images are retaken" \
  grep -q "image format 0 cache format 0 -> image format .*not restored by this version" "$LOG/apt-install.log"
mkdir -p "$ROOT/opt/warmer/examples/slowweb" "$ROOT/etc/warmer/manifests"
# Every run starts from a clean slate: no images, no journal, pristine service.
rm -rf "$ROOT/var/cache/warmer" "$ROOT/var/log/journal"
mkdir -p "$ROOT/var/log/journal"
install -m 0755 examples/slowweb/server.py "$ROOT/opt/warmer/examples/slowweb/server.py"
install -m 0644 manifests/slowweb.yaml "$ROOT/etc/warmer/manifests/slowweb.yaml"
install -D -m 0755 examples/ledger/ledger.py "$ROOT/opt/warmer/examples/ledger/ledger.py"
install -m 0644 manifests/ledger.yaml "$ROOT/etc/warmer/manifests/ledger.yaml"
rm -rf "$ROOT/var/lib/ledger"
# A service as its unit would run it: another user, its own /tmp, a read-only system.
cat >"$ROOT/etc/warmer/manifests/boxed.yaml" <<'YAML'
exec: ["/usr/bin/python3", "/opt/warmer/examples/slowweb/server.py", "--port", "8092", "--warmup", "0.5"]
user: nobody
ready: {http: "http://127.0.0.1:8092/health", timeout: 60s}
checkpoint: {settle: 200ms}
sandbox: {private_tmp: true, protect_system: strict, no_new_privileges: true, runtime_directory: [boxed]}
restore: {mode: lazy}
YAML
# An installed service of the operator's own, adopted under its own name.
# (A rootfs reused from an earlier run: the unit as never enabled or adopted.)
rm -f "$ROOT/etc/warmer/manifests/adoptee.yaml"
rm -rf "$ROOT/etc/systemd/system/adoptee.service.d"
rm -f "$ROOT/etc/systemd/system/multi-user.target.wants/adoptee.service"
# Debian's own services (in the rootfs as their packages installed them), as
# never adopted.
for u in tomcat10 prometheus postgresql@15-main; do
  rm -rf "$ROOT/etc/systemd/system/$u.service.d"
  rm -f "$ROOT/etc/warmer/manifests/${u//@/-}.yaml"
done
cat >"$ROOT/etc/systemd/system/adoptee.service" <<'UNIT'
[Unit]
Description=a service installed before warmer

[Service]
User=nobody
Environment="WARMUP=0.5"
ExecStart=/usr/bin/python3 /opt/warmer/examples/slowweb/server.py --port 8093 --warmup ${WARMUP}
PrivateTmp=yes
ProtectSystem=strict
NoNewPrivileges=yes

[Install]
WantedBy=multi-user.target
UNIT
systemctl --root="$ROOT" enable "$SVC" warmer@ledger.service warmer@boxed.service warmer-verify.service >/dev/null 2>&1

# ---------------------------------------------------------------- boot 1
boot
wait_until 60 is_active || fatal "$SVC not active after boot"
check "boot 1: cold start" started_as cold
check "boot 1: checkpoint stored" wait_until 60 has_image
before=$(nonce)
say "in-memory nonce before the reboot: $before"
LEDGER=warmer@ledger.service
ledger_active() { [ "$(in_ct systemctl is-active "$LEDGER" 2>/dev/null)" = active ]; }
ledger() { in_ct curl -fs "http://127.0.0.1:8090/$1"; }
ledger_field() { ledger state | python3 -c "import json,sys; v=json.load(sys.stdin); print(eval('v'+sys.argv[1]))" "$1"; }
wait_until 60 ledger_active || fatal "$LEDGER not active after boot"
check "persist: cold start at first boot" test "$(status_of ledger "['last_start']")" = cold
for i in 1 2 3 4 5; do ledger "write?v=boot1-$i" >/dev/null; done
ledger_nonce=$(ledger_field "['nonce']")
check "persist: 5 writes acknowledged" test "$(ledger_field "['count']")" = 5
dropin_mounts() {
  in_ct systemctl show -p RequiresMountsFor --value "$LEDGER" | grep -q /var/lib/ledger &&
    [ "$(in_ct systemctl show -p TimeoutStopUSec --value "$LEDGER")" = 50s ]
}
check "persist: generated drop-in (RequiresMountsFor state, TimeoutStopSec)" dropin_mounts

BOXED=warmer@boxed.service
boxed_active() { [ "$(in_ct systemctl is-active "$BOXED" 2>/dev/null)" = active ]; }
boxed_nonce() { in_ct curl -fs http://127.0.0.1:8092/state | python3 -c "import json,sys; print(json.load(sys.stdin)['nonce'])"; }
boxed_has_image() { [ -n "$(status_of boxed "['image']")" ] && [ "$(status_of boxed "['state']")" = ready ]; }
boxed_uid() { in_ct stat -c %u "/proc/$(status_of boxed "['pid']")"; }
wait_until 60 boxed_active || fatal "$BOXED not active after boot"
check "sandbox: cold start at first boot" test "$(status_of boxed "['last_start']")" = cold
check "sandbox: checkpoint stored" wait_until 60 boxed_has_image
check "sandbox: runs as nobody" test "$(boxed_uid)" = 65534
boxed_before=$(boxed_nonce)

ADOPTEE=adoptee.service
adoptee_active() { [ "$(in_ct systemctl is-active "$ADOPTEE" 2>/dev/null)" = active ]; }
adoptee_nonce() { in_ct curl -fs http://127.0.0.1:8093/state | python3 -c "import json,sys; print(json.load(sys.stdin)['nonce'])"; }
adoptee_ready() { [ "$(status_of adoptee "['state']")" = ready ] && [ -n "$(status_of adoptee "['image']")" ]; }
unit_as_shipped=$(in_ct systemctl cat "$ADOPTEE")
check "adopt: --enable" in_ct /usr/bin/warmer adopt adoptee --ready http://127.0.0.1:8093/health --enable
in_ct systemctl enable "$ADOPTEE" >/dev/null 2>&1
in_ct systemctl restart "$ADOPTEE"
check "adopt: systemctl start runs it through warmer (cold, checkpoint)" wait_until 60 adoptee_ready
check "adopt: cold first" test "$(status_of adoptee "['last_start']")" = cold
in_ct systemctl restart "$ADOPTEE"
wait_until 60 adoptee_active
check "adopt: systemctl restart restores" test "$(status_of adoptee "['last_start']")" = restored
adoptee_before=$(adoptee_nonce)

# Debian's tomcat10, prometheus and postgresql@15-main as their packages
# installed them, adopted under their own names.
DEBIAN_UNITS=(tomcat10 prometheus postgresql@15-main)
declare -A ADOPT_ARGS=(
  [tomcat10]="--ready http://127.0.0.1:8095/"
  [prometheus]="--ready http://127.0.0.1:9090/-/ready --mode persist"
  [postgresql@15-main]="--mode persist"
)
declare -A SHIPPED
deb_svc() { echo "${1//@/-}"; }
deb_ready() {
  [ "$(in_ct systemctl is-active "$1.service" 2>/dev/null)" = active ] &&
    [ "$(status_of "$(deb_svc "$1")" "['state']")" = ready ]
}
deb_started() { status_of "$(deb_svc "$1")" "['last_start']"; }
pg() { in_ct runuser -u postgres -- psql -XAtc "$1"; }
for u in "${DEBIAN_UNITS[@]}"; do
  SHIPPED[$u]=$(in_ct systemctl cat "$u.service")
  # shellcheck disable=SC2086 # the arguments are words
  check "debian: warmer adopt $u --enable" in_ct /usr/bin/warmer adopt "$u" ${ADOPT_ARGS[$u]} --enable
  in_ct systemctl restart "$u.service" || true
done
deb_journal() { in_ct journalctl -u "$1.service" -b --no-pager -o cat | tail -n 25 >&2 || true; }
for u in "${DEBIAN_UNITS[@]}"; do
  check "debian: systemctl restart $u runs it through warmer" wait_until 180 deb_ready "$u" || deb_journal "$u"
done
tomcat_image() { [ -n "$(status_of tomcat10 "['image']")" ]; }
check "debian: tomcat10 checkpointed" wait_until 120 tomcat_image
check "debian: a row committed in postgresql" \
  pg "DROP TABLE IF EXISTS warmer_test; CREATE TABLE warmer_test (v text); INSERT INTO warmer_test VALUES ('boot1');"
for u in "${DEBIAN_UNITS[@]}"; do
  in_ct systemctl restart "$u.service" || true
  wait_until 180 deb_ready "$u" || deb_journal "$u"
  check "debian: systemctl restart $u restores" test "$(deb_started "$u")" = restored
done
status_agrees() {
  in_ct systemctl show -p StatusText --value tomcat10.service | grep -q "restored in" &&
    [ "$(in_ct systemctl show -p MainPID --value tomcat10.service)" = \
      "$(in_ct pgrep -o -f '/usr/bin/warmer run tomcat10')" ]
}
check "debian: systemctl status tomcat10 and warmer status agree (restored, warmer the main PID)" status_agrees

# ---------------------------------------------------------------- boot 2
reboot_ct
wait_until 60 is_active || fatal "$SVC not active after reboot"
check "reboot: restored from the cache" started_as restored
check "reboot: memory from before the reboot" test "$(nonce)" = "$before"
in_ct curl -fs http://127.0.0.1:8080/hit >/dev/null
journal_after_restore() {
  in_ct journalctl -u "$SVC" -b --no-pager -o cat | sed -n '/ready: restored in/,$p' |
    grep -q "slowweb: hit 1 (nonce $before)"
}
check "journal shows the service's output after the restore" wait_until 10 journal_after_restore
check "journal of the previous boot has the cold start" \
  bash -c "nsenter -t $LEADER -a -- journalctl -u $SVC -b -1 --no-pager -o cat | grep -q 'ready: cold start'"
journal_fields() {
  local digest
  digest=$(status_field "['digest']")
  [ -n "$digest" ] || return 1
  in_ct journalctl -b --no-pager -o verbose SERVICE=slowweb PHASE=ready | grep -q "READY_MS=" &&
    in_ct journalctl -b --no-pager -o cat "DIGEST=$digest" | grep -q "ready: restored in"
}
check "journal entries carry SERVICE, PHASE, READY_MS and DIGEST" journal_fields
verified_at_boot() {
  in_ct journalctl -u warmer-verify.service -b --no-pager -o cat | grep -q "^ok .* slowweb"
}
check "warmer-verify checked the image at boot" wait_until 30 verified_at_boot
check "systemctl status says restored" \
  bash -c "nsenter -t $LEADER -a -- systemctl status $SVC --no-pager | grep -q 'restored in'"

# ---------------------------------------------------------------- sandbox across the reboot
wait_until 60 boxed_active || fatal "$BOXED not active after reboot"
boxed_ready() { [ "$(status_of boxed "['state']")" = ready ]; }
wait_until 60 boxed_ready
check "sandbox: restored after the reboot" test "$(status_of boxed "['last_start']")" = restored
check "sandbox: memory from before the reboot" test "$(boxed_nonce)" = "$boxed_before"
check "sandbox: restored as nobody" test "$(boxed_uid)" = 65534
boxed_lazy() {
  in_ct python3 -c "import json,sys; sys.exit(0 if json.load(open('/run/warmer/boxed/state.json'))['restore_choice']['lazy'] else 1)"
}
check "sandbox: restored lazily (its user namespace got a userfaultfd: /dev/userfaultfd)" boxed_lazy

# ---------------------------------------------------------------- adopted unit across the reboot
wait_until 60 adoptee_active || fatal "$ADOPTEE not active after reboot"
adoptee_restored() { [ "$(status_of adoptee "['state']")" = ready ]; }
wait_until 60 adoptee_restored
check "adopt: restored under its own name after the reboot" test "$(status_of adoptee "['last_start']")" = restored
check "adopt: memory from before the reboot" test "$(adoptee_nonce)" = "$adoptee_before"
in_ct systemctl stop "$ADOPTEE"
check "unadopt" in_ct /usr/bin/warmer unadopt adoptee
check "unadopt: the unit as shipped (systemctl cat)" test "$(in_ct systemctl cat "$ADOPTEE")" = "$unit_as_shipped"

# ---------------------------------------------------------------- Debian's services across the reboot
for u in "${DEBIAN_UNITS[@]}"; do
  wait_until 180 deb_ready "$u" || { say "$u not ready after the reboot"; deb_journal "$u"; }
  check "debian: $u restored under its own name after the reboot" test "$(deb_started "$u")" = restored
done
check "debian: postgresql's committed row across the reboot" test "$(pg "SELECT v FROM warmer_test")" = boot1
for u in "${DEBIAN_UNITS[@]}"; do
  in_ct systemctl stop "$u.service" || true
  check "debian: warmer unadopt $u" in_ct /usr/bin/warmer unadopt "$u"
  check "debian: $u as its package shipped it (systemctl cat)" test "$(in_ct systemctl cat "$u.service")" = "${SHIPPED[$u]}"
done
in_ct systemctl start postgresql@15-main.service || true
check "debian: postgresql runs as its package runs it again, with the row" \
  wait_until 60 bash -c "nsenter -t $LEADER -a -- runuser -u postgres -- psql -XAtc 'SELECT v FROM warmer_test' 2>/dev/null | grep -qx boot1"
in_ct systemctl stop postgresql@15-main.service || true

# ---------------------------------------------------------------- persist across the reboot
wait_until 60 ledger_active || fatal "$LEDGER not active after reboot"
check "persist: restored after the reboot" test "$(status_of ledger "['last_start']")" = restored
check "persist: same memory after the reboot" test "$(ledger_field "['nonce']")" = "$ledger_nonce"
check "persist: every write in memory" test "$(ledger_field "['count']")" = 5
check "persist: every write on disk" test "$(ledger_field "['lines'].__len__()")" = 5
stop_checkpoint_logged() {
  in_ct journalctl -u "$LEDGER" -b -1 --no-pager -o cat | grep -q "checkpointing the service's state at stop"
}
check "persist: the shutdown took the stop-time checkpoint" stop_checkpoint_logged
ledger "write?v=boot2-1" >/dev/null
ledger "write?v=boot2-2" >/dev/null
in_ct systemctl kill -s KILL "$LEDGER"
ledger_cold_again() {
  ledger_active && [ "$(status_of ledger "['last_start']")" = cold ] &&
    [ "$(status_of ledger "['state']")" = ready ]
}
check "persist: after kill -9, restarted cold (never the older image)" wait_until 60 ledger_cold_again
check "persist: after kill -9, every write kept" test "$(ledger_field "['count']")" = 7
check "persist: after kill -9, fresh memory" test "$(ledger_field "['nonce']")" != "$ledger_nonce"

# ---------------------------------------------------------------- stop / start / restart / kill
in_ct systemctl stop "$SVC"
check "stop: nothing left running" nothing_left
check "stop: clean result" test "$(in_ct systemctl show -p Result --value "$SVC")" = success
in_ct systemctl start "$SVC"
check "start: restored again" started_as restored
in_ct systemctl restart "$SVC"
check "restart: restored again" started_as restored
check "restart: same memory" test "$(nonce)" = "$before"
in_ct systemctl kill "$SVC"
check "kill: service gone" wait_until 30 is_inactive
check "kill: nothing left running" wait_until 10 nothing_left
in_ct systemctl start "$SVC"
check "start after kill: restored" started_as restored

# ---------------------------------------------------------------- new program
echo "# new build" >>"$ROOT/opt/warmer/examples/slowweb/server.py"
reboot_ct
wait_until 60 is_active || fatal "$SVC not active after the third boot"
check "changed program: cold start after reboot" started_as cold
check "changed program: fresh memory" test "$(nonce)" != "$before"

# ---------------------------------------------------------------- the package, then purge
check "package: /usr/sbin/criu belongs to dpkg's criu" bash -c "nsenter -t $LEADER -a -- dpkg -S /usr/sbin/criu | grep -q '^criu:'"
man_page() { in_ct env MANPAGER=cat COLUMNS=100 man "$1" 2>/dev/null | grep -q "$2"; }
check "package: man warmer" man_page warmer "warmer-adopt"
check "package: man warmer.yaml" man_page warmer.yaml "protect_system"
completes_services() {
  local words
  words=$(in_ct bash -c 'source /usr/share/bash-completion/bash_completion
    source /usr/share/bash-completion/completions/warmer
    COMP_WORDS=(warmer status ""); COMP_CWORD=2; COMP_LINE="warmer status "; COMP_POINT=${#COMP_LINE}
    _warmer_with_services warmer "" status; echo "${COMPREPLY[*]}"')
  for w in slowweb ledger boxed adoptee; do [[ " $words " == *" $w "* ]] || return 1; done
}
check "package: warmer status <TAB> completes the services" completes_services
# Adopted again, so the removal has a unit to give back.
in_ct /usr/bin/warmer adopt adoptee --ready http://127.0.0.1:8093/health --enable --force >/dev/null
package_files=$(in_ct dpkg -L warmer)
in_ct env DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq warmer criu >"$LOG/apt-purge.log" 2>&1 ||
  { tail -n 20 "$LOG/apt-purge.log" >&2; fatal "apt purge failed"; }
no_package_file_left() {
  local f left=0
  while read -r f; do
    [ -n "$f" ] && [ ! -d "$ROOT$f" ] && [ -e "$ROOT$f" ] && { say "left: $f"; left=1; }
  done <<<"$package_files"
  for f in /usr/share/doc/warmer /var/cache/warmer /var/lib/warmer /run/warmer /usr/sbin/criu; do
    [ -e "$ROOT$f" ] && { say "left: $f"; left=1; }
  done
  [ "$left" = 0 ]
}
check "purge: no file of warmer or criu left, nor the image cache" no_package_file_left
no_dangling_links() { ! in_ct find /etc/systemd/system -xtype l | grep .; }
check "purge: no enablement symlink left behind" no_dangling_links
check "purge: nothing of warmer still running" bash -c "! nsenter -t $LEADER -a -- pgrep -x warmer >/dev/null"
check "purge: the adopted unit as shipped again" test "$(in_ct systemctl cat "$ADOPTEE")" = "$unit_as_shipped"

shutdown_ct
say "logs: $LOG"
echo "systemd: $PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
