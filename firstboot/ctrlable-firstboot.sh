#!/usr/bin/env bash
# ctrlable-firstboot: the first boot of a guest cloned from a Ctrlable template.
#
# New machine-id and SSH host keys, confirm the hostname, fetch this guest's assignment from the
# companion (bound to its hostname and eth0 MAC), apply the service wiring for its type, restart
# the app, report complete, disable the unit. Run once by ctrlable-firstboot.service; a re-run
# after success is a no-op (done marker), a re-run after a failure picks up where it stopped.
#
# Configuration: /etc/ctrlable/firstboot.conf (KEY=VALUE, written by the build wrapper):
#   COMPANION_URL=https://companion.lan:8580   the companion's base URL
#   FIRSTBOOT_SECRET=...                        the per-release secret (sent as X-Ctrlable-Secret)
#   COMPANION_CA_FILE=/etc/ctrlable/ca.pem      optional: CA that signs the companion's cert
#   COMPANION_PINNED_PUBKEY=sha256//...         optional: curl --pinnedpubkey value
#   TEMPLATE_TYPE=zigbee2mqtt                   optional: refuse an assignment of another type
#   RETRY_MAX_SECONDS=300                       optional: how long to retry the companion
#
# Every path and command can be redirected with environment variables (see init_settings) so the
# tests run this script against a directory standing for "/": CTRLABLE_ROOT=<dir>.
# JSON and YAML are edited by python3 (embedded below; no modules outside the standard library).
# Secrets are never logged, never put on a command line and never written outside the app's
# own config files and a private work directory that is removed on exit.
# Docs: docs/firstboot.md.

set -euo pipefail

readonly FIRSTBOOT_VERSION="1"
readonly TAG="ctrlable-firstboot"
readonly UNIT="ctrlable-firstboot.service"
readonly LXC_TYPES="zigbee2mqtt zwavejs frigate docker-portainer freepbx"

# --------------------------------------------------------------------------------------------
# Settings and logging
# --------------------------------------------------------------------------------------------

init_settings() {
  ROOT="${CTRLABLE_ROOT:-}"
  ROOT="${ROOT%/}"
  CONF="${CTRLABLE_FIRSTBOOT_CONF:-$ROOT/etc/ctrlable/firstboot.conf}"
  STATE_DIR="${CTRLABLE_STATE_DIR:-$ROOT/var/lib/ctrlable}"
  DONE_MARKER="${CTRLABLE_DONE_MARKER:-$STATE_DIR/firstboot.done}"
  RUN_DIR="${CTRLABLE_RUN_DIR:-$ROOT/run}"
  IFACE="${CTRLABLE_IFACE:-eth0}"
  SYS_NET="${CTRLABLE_SYS_NET:-$ROOT/sys/class/net}"

  SYSTEMCTL="${CTRLABLE_SYSTEMCTL:-systemctl}"
  HOSTNAMECTL="${CTRLABLE_HOSTNAMECTL:-hostnamectl}"
  MACHINE_ID_SETUP="${CTRLABLE_MACHINE_ID_SETUP:-systemd-machine-id-setup}"
  SSH_KEYGEN="${CTRLABLE_SSH_KEYGEN:-ssh-keygen}"
  CURL="${CTRLABLE_CURL:-curl}"
  PYTHON="${CTRLABLE_PYTHON:-python3}"
  LOGGER="${CTRLABLE_LOGGER:-logger}"
  DOCKER="${CTRLABLE_DOCKER:-docker}"
  MYSQL="${CTRLABLE_MYSQL:-mysql}"

  RETRY_MAX_DELAY="${CTRLABLE_RETRY_MAX_DELAY:-30}"
  PORTAINER_URL="${CTRLABLE_PORTAINER_URL:-https://127.0.0.1:9443}"
  PORTAINER_CONTAINER="${CTRLABLE_PORTAINER_CONTAINER:-portainer}"
  PORTAINER_WAIT="${CTRLABLE_PORTAINER_WAIT:-120}"

  # The apps' files (docs/firstboot.md; community-scripts.md §4).
  export CTRLABLE_Z2M_CONFIG="${CTRLABLE_Z2M_CONFIG:-$ROOT/opt/zigbee2mqtt/data/configuration.yaml}"
  export CTRLABLE_ZWAVE_STORE="${CTRLABLE_ZWAVE_STORE:-$ROOT/opt/zwave_store}"
  export CTRLABLE_ZWAVE_ENV="${CTRLABLE_ZWAVE_ENV:-$ROOT/opt/.env}"
  export CTRLABLE_FRIGATE_CONFIG="${CTRLABLE_FRIGATE_CONFIG:-$ROOT/config/config.yml}"
  export CTRLABLE_FREEPBX_CONF="${CTRLABLE_FREEPBX_CONF:-$ROOT/etc/freepbx.conf}"
  export CTRLABLE_AMPORTAL_CONF="${CTRLABLE_AMPORTAL_CONF:-$ROOT/etc/amportal.conf}"
  export CTRLABLE_ODBC_CONF="${CTRLABLE_ODBC_CONF:-$ROOT/etc/asterisk/res_odbc_additional.conf}"

  COMPANION_URL=""
  SECRET=""
  CA_FILE=""
  PINNED_PUBKEY=""
  TEMPLATE_TYPE=""
  RETRY_MAX="${CTRLABLE_RETRY_MAX_SECONDS:-}"
  WORK=""
  HTTP_STATUS=""
}

sandboxed() {
  [[ -n $ROOT ]]
}

# log LEVEL MESSAGE... (LEVEL: info, warning, err). Never pass a secret here.
log() {
  local level=$1
  shift
  printf '%s: %s: %s\n' "$TAG" "$level" "$*" >&2
  "$LOGGER" -t "$TAG" -p "user.$level" -- "$*" >/dev/null 2>&1 || true
}

die() {
  log err "$*"
  exit 1
}

cleanup() {
  if [[ -n $WORK && -d $WORK ]]; then
    rm -rf -- "$WORK"
  fi
}

step_done() {
  [[ -e "$STATE_DIR/steps/$1" ]]
}

mark_step() {
  mkdir -p -- "$STATE_DIR/steps"
  : >"$STATE_DIR/steps/$1"
}

# fact KEY VALUE: one line of the completion report (values are not secrets).
fact() {
  printf '%s=%s\n' "$1" "$2" >>"$WORK/facts"
}

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

unquote() {
  local value=$1
  if [[ ${#value} -ge 2 && ${value:0:1} == "${value: -1}" && ${value:0:1} == ["'\""] ]]; then
    value=${value:1:${#value}-2}
  fi
  printf '%s' "$value"
}

read_conf() {
  [[ -r $CONF ]] || die "configuration $CONF is missing or unreadable"
  local line key value number=0
  while IFS= read -r line || [[ -n $line ]]; do
    number=$((number + 1))
    line="${line#"${line%%[![:space:]]*}"}"
    line="${line%"${line##*[![:space:]]}"}"
    [[ -z $line || $line == \#* ]] && continue
    [[ $line == *=* ]] || die "$CONF:$number: expected KEY=VALUE"
    key="${line%%=*}"
    value="$(unquote "${line#*=}")"
    case $key in
    COMPANION_URL) COMPANION_URL="${value%/}" ;;
    FIRSTBOOT_SECRET) SECRET=$value ;;
    COMPANION_CA_FILE) CA_FILE=$value ;;
    COMPANION_PINNED_PUBKEY) PINNED_PUBKEY=$value ;;
    TEMPLATE_TYPE) TEMPLATE_TYPE=$value ;;
    RETRY_MAX_SECONDS) [[ -n $RETRY_MAX ]] || RETRY_MAX=$value ;;
    *) log warning "$CONF:$number: unknown key $key ignored" ;;
    esac
  done <"$CONF"

  local url_re='^https?://[][A-Za-z0-9._:-]+(/[A-Za-z0-9._~/-]*)?$'
  [[ $COMPANION_URL =~ $url_re ]] ||
    die "$CONF: COMPANION_URL must be http(s)://host[:port][/path]"
  [[ $COMPANION_URL == https://* ]] ||
    log warning "COMPANION_URL is plain http: the secret crosses the LAN unencrypted"
  [[ $SECRET =~ ^[A-Za-z0-9._~+/=-]{16,256}$ ]] ||
    die "$CONF: FIRSTBOOT_SECRET is missing or not 16-256 of A-Z a-z 0-9 . _ ~ + / = -"
  if [[ -n $CA_FILE ]]; then
    [[ $CA_FILE == /* ]] && CA_FILE="$ROOT$CA_FILE"
    [[ -r $CA_FILE ]] || die "$CONF: COMPANION_CA_FILE $CA_FILE is not readable"
  fi
  if [[ -n $PINNED_PUBKEY && ! $PINNED_PUBKEY =~ ^sha256//[A-Za-z0-9+/=]+(\;sha256//[A-Za-z0-9+/=]+)*$ ]]; then
    die "$CONF: COMPANION_PINNED_PUBKEY must look like sha256//<base64>"
  fi
  if [[ -n $TEMPLATE_TYPE && " $LXC_TYPES " != *" $TEMPLATE_TYPE "* ]]; then
    die "$CONF: TEMPLATE_TYPE must be one of: $LXC_TYPES"
  fi
  RETRY_MAX="${RETRY_MAX:-300}"
  [[ $RETRY_MAX =~ ^[0-9]+$ ]] || die "RETRY_MAX_SECONDS must be a whole number of seconds"
  [[ $RETRY_MAX_DELAY =~ ^[1-9][0-9]*$ ]] || die "CTRLABLE_RETRY_MAX_DELAY must be >= 1"
  [[ $PORTAINER_WAIT =~ ^[0-9]+$ ]] || die "CTRLABLE_PORTAINER_WAIT must be a number"
}

check_tools() {
  local tool
  for tool in "$CURL" "$PYTHON"; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is required but not installed"
  done
}

# --------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------

valid_machine_id() {
  [[ -s $1 && $(head -c 33 "$1") =~ ^[0-9a-f]{32}$ ]]
}

step_machine_id() {
  local file="$ROOT/etc/machine-id" dbus="$ROOT/var/lib/dbus/machine-id" dbus_copy=no
  if step_done machine-id; then
    log info "machine-id: already regenerated"
    fact machine_id_changed true
    return
  fi
  mkdir -p -- "$ROOT/etc"
  if ! sandboxed && mountpoint -q /etc/machine-id 2>/dev/null; then
    # systemd booted with an empty file and mounted a fresh id over it: keep that one.
    "$MACHINE_ID_SETUP" --commit || die "machine-id: systemd-machine-id-setup --commit failed"
  else
    rm -f -- "$file"
    # systemd-machine-id-setup would copy the old D-Bus id back: drop a stale copy first.
    if [[ -f $dbus && ! -L $dbus ]]; then
      rm -f -- "$dbus"
      dbus_copy=yes
    fi
    if command -v "$MACHINE_ID_SETUP" >/dev/null 2>&1; then
      if sandboxed; then
        "$MACHINE_ID_SETUP" --root="$ROOT" >/dev/null 2>&1 ||
          log warning "machine-id: $MACHINE_ID_SETUP failed; generating one"
      else
        "$MACHINE_ID_SETUP" >/dev/null 2>&1 ||
          log warning "machine-id: $MACHINE_ID_SETUP failed; generating one"
      fi
    fi
    if ! valid_machine_id "$file"; then
      od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$file"
      printf '\n' >>"$file"
    fi
  fi
  valid_machine_id "$file" || die "machine-id: $file is not a valid id after regeneration"
  chmod 0444 "$file"
  if [[ $dbus_copy == yes ]]; then
    cp -- "$file" "$dbus"
  fi
  mark_step machine-id
  fact machine_id_changed true
  log info "machine-id: regenerated"
}

step_ssh_host_keys() {
  local dir="$ROOT/etc/ssh" pub
  if ! command -v "$SSH_KEYGEN" >/dev/null 2>&1; then
    log warning "ssh host keys: $SSH_KEYGEN not installed; skipped"
    fact ssh_host_keys_changed false
    return
  fi
  if ! step_done ssh-host-keys; then
    mkdir -p -- "$dir"
    rm -f -- "$dir"/ssh_host_*_key "$dir"/ssh_host_*_key.pub
    if sandboxed; then
      "$SSH_KEYGEN" -A -f "$ROOT" >/dev/null || die "ssh host keys: ssh-keygen -A failed"
    else
      "$SSH_KEYGEN" -A >/dev/null || die "ssh host keys: ssh-keygen -A failed"
    fi
    mark_step ssh-host-keys
    log info "ssh host keys: regenerated"
  else
    log info "ssh host keys: already regenerated"
  fi
  fact ssh_host_keys_changed true
  for pub in "$dir"/ssh_host_*_key.pub; do
    [[ -e $pub ]] || continue
    fact ssh_host_key "$("$SSH_KEYGEN" -lf "$pub" | awk '{print $NF " " $2}')"
  done
}

read_hostname() {
  local name=""
  if [[ -r "$ROOT/etc/hostname" ]]; then
    IFS= read -r name <"$ROOT/etc/hostname" || true
  fi
  if [[ -z $name ]] && ! sandboxed; then
    name="$(uname -n)"
  fi
  name="${name%%.*}"
  name="${name,,}"
  [[ $name =~ ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$ ]] ||
    die "hostname '$name' is not a DNS label; PVE sets it from the clone's hostname"
  HOSTNAME_SELF=$name
}

read_mac() {
  local file="${CTRLABLE_MAC_FILE:-$SYS_NET/$IFACE/address}" mac=""
  [[ -r $file ]] || die "cannot read the MAC of $IFACE from $file"
  IFS= read -r mac <"$file" || true
  mac="${mac^^}"
  [[ $mac =~ ^[0-9A-F]{2}(:[0-9A-F]{2}){5}$ ]] || die "MAC '$mac' of $IFACE is not a MAC address"
  MAC_SELF=$mac
}

# confirm_hostname NAME: /etc/hostname (and the kernel's name, outside the sandbox) say NAME.
confirm_hostname() {
  local want=$1 current=""
  if [[ -r "$ROOT/etc/hostname" ]]; then
    IFS= read -r current <"$ROOT/etc/hostname" || true
  fi
  if [[ ${current,,} != "$want" ]]; then
    printf '%s\n' "$want" >"$ROOT/etc/hostname"
    log info "hostname: /etc/hostname set to $want"
  fi
  if ! sandboxed && [[ $(uname -n) != "$want" ]]; then
    "$HOSTNAMECTL" set-hostname "$want" 2>/dev/null || hostname "$want" ||
      log warning "hostname: could not set the running hostname"
  fi
  if [[ -f "$ROOT/etc/hosts" ]] && ! grep -Eq "[[:space:]]$want([[:space:]]|\$)" "$ROOT/etc/hosts"; then
    printf '127.0.1.1\t%s\n' "$want" >>"$ROOT/etc/hosts"
  fi
  fact hostname_confirmed "$want"
  log info "hostname: $want confirmed"
}

# --------------------------------------------------------------------------------------------
# Talking to the companion
# --------------------------------------------------------------------------------------------

# http_call METHOD URL OUT [BODY]: prints the HTTP status; the secret goes in via stdin config.
http_call() {
  local method=$1 url=$2 out=$3 body=${4:-}
  local -a args=(--silent --show-error --config - --output "$out" --dump-header "$WORK/headers"
    --write-out '%{http_code}' --connect-timeout 5 --max-time 30 --request "$method")
  [[ -n $CA_FILE ]] && args+=(--cacert "$CA_FILE")
  [[ -n $PINNED_PUBKEY ]] && args+=(--pinnedpubkey "$PINNED_PUBKEY")
  if [[ -n $body ]]; then
    args+=(--header "Content-Type: application/json" --data-binary "@$body")
  fi
  printf 'header = "X-Ctrlable-Secret: %s"\n' "$SECRET" | "$CURL" "${args[@]}" -- "$url"
}

retry_after() {
  local value
  value="$(sed -n 's/^[Rr]etry-[Aa]fter:[[:space:]]*\([0-9][0-9]*\).*/\1/p' "$WORK/headers" 2>/dev/null | head -n 1)"
  printf '%s' "${value:-0}"
}

# companion METHOD PATH OUT [BODY]: retries (exponential backoff, bounded by RETRY_MAX seconds)
# while the network or the companion is not there; sets HTTP_STATUS; 1 when it gave up.
companion() {
  local method=$1 path=$2 out=$3 body=${4:-}
  local delay=1 deadline=$((SECONDS + RETRY_MAX)) status rc wait
  while :; do
    rc=0
    status="$(http_call "$method" "$COMPANION_URL$path" "$out" "$body" 2>"$WORK/curl.err")" || rc=$?
    if [[ $rc -eq 0 && $status =~ ^[0-9]{3}$ && $status != 000 && $status != 408 && $status != 429 && $status != 5* ]]; then
      HTTP_STATUS=$status
      return 0
    fi
    wait=$delay
    if [[ $status == 429 ]]; then
      local hint
      hint="$(retry_after)"
      ((hint > wait)) && wait=$hint
    fi
    if ((SECONDS + wait > deadline)); then
      log err "companion: $method ${path%%\?*} failed (curl exit $rc, HTTP ${status:-none}); giving up after ${RETRY_MAX}s"
      HTTP_STATUS=${status:-000}
      return 1
    fi
    log warning "companion: $method ${path%%\?*} not answered (curl exit $rc, HTTP ${status:-none}: $(head -c 200 "$WORK/curl.err" | tr '\n' ' ')); retrying in ${wait}s"
    sleep "$wait"
    delay=$((delay * 2))
    ((delay > RETRY_MAX_DELAY)) && delay=$RETRY_MAX_DELAY
  done
}

# The companion's error code and message (never secrets) for a log line.
error_of() {
  py error "$1" 2>/dev/null || printf 'HTTP %s' "$HTTP_STATUS"
}

# --------------------------------------------------------------------------------------------
# Wiring
# --------------------------------------------------------------------------------------------

py() {
  "$PYTHON" -c "$PY_HELPER" "$@"
}

# py_or_die WHAT HELPER-ARGS...: run the helper; on failure die with its last error line (the
# helper names files and keys in its errors, never values).
py_or_die() {
  local what=$1
  shift
  if ! py "$@" 2>"$WORK/py.err"; then
    die "$what: $(tail -n 1 "$WORK/py.err" | cut -c1-300)"
  fi
}

app_unit() {
  case $1 in
  zigbee2mqtt) printf 'zigbee2mqtt.service' ;;
  zwavejs) printf 'zwave-js-ui.service' ;;
  frigate) printf 'frigate.service' ;;
  freepbx) printf 'freepbx.service' ;;
  docker-portainer) printf '' ;;
  esac
}

step_apply() {
  local type=$1
  if step_done apply; then
    log info "wiring: already applied"
    return
  fi
  py_or_die "wiring: applying the $type wiring failed" apply "$type" "$WORK/assignment.json" >"$WORK/applied"
  while IFS= read -r line; do
    [[ -n $line ]] && fact changed_file "${line#"$ROOT"}"
  done <"$WORK/applied"
  mark_step apply
  log info "wiring: $type configuration written"
}

# local_http METHOD URL OUT [BODY]: for the app's own API on this guest (no companion secret).
local_http() {
  local method=$1 url=$2 out=$3 body=${4:-}
  local -a args=(--silent --output "$out" --write-out '%{http_code}' --connect-timeout 3
    --max-time 20 --request "$method")
  if [[ $url =~ ^https://(127\.0\.0\.1|localhost)[:/] ]]; then
    args+=(--insecure) # Portainer's own self-signed certificate on loopback
  fi
  if [[ -n $body ]]; then
    args+=(--header "Content-Type: application/json" --data-binary "@$body")
  fi
  "$CURL" "${args[@]}" -- "$url" 2>/dev/null || true
}

step_portainer_admin() {
  local status deadline
  if step_done portainer-admin; then
    log info "portainer: admin already created"
    fact portainer_admin created
    return
  fi
  # A restart reopens Portainer's first-admin window (it closes minutes after a start).
  "$DOCKER" restart "$PORTAINER_CONTAINER" >/dev/null 2>&1 ||
    log warning "portainer: could not restart container $PORTAINER_CONTAINER"
  deadline=$((SECONDS + PORTAINER_WAIT))
  until [[ $(local_http GET "$PORTAINER_URL/api/system/status" "$WORK/portainer.out") == 200 ]]; do
    ((SECONDS < deadline)) || die "portainer: no answer from $PORTAINER_URL within ${PORTAINER_WAIT}s"
    sleep 2
  done
  status="$(local_http GET "$PORTAINER_URL/api/users/admin/check" "$WORK/portainer.out")"
  if [[ $status == 204 ]]; then
    die "portainer: an admin already exists that first boot did not create; refusing (check who did)"
  fi
  py_or_die "portainer: no admin login in the assignment" \
    portainer-body "$WORK/assignment.json" "$WORK/portainer.json"
  status="$(local_http POST "$PORTAINER_URL/api/users/admin/init" "$WORK/portainer.out" "$WORK/portainer.json")"
  rm -f -- "$WORK/portainer.json"
  [[ $status == 200 ]] || die "portainer: creating the admin failed (HTTP $status)"
  mark_step portainer-admin
  fact portainer_admin created
  log info "portainer: admin created"
}

step_freepbx_identity() {
  if step_done freepbx-identity; then
    log info "freepbx: identity already set"
    return
  fi
  py_or_die "freepbx: could not prepare the database update" \
    freepbx-sql "$WORK/assignment.json" "$WORK/freepbx.sql"
  "$MYSQL" <"$WORK/freepbx.sql" >/dev/null || die "freepbx: the database update failed"
  rm -f -- "$WORK/freepbx.sql"
  mark_step freepbx-identity
  fact freepbx_identity set
  log info "freepbx: admin login and database secret set"
}

restart_app() {
  local unit
  unit="$(app_unit "$1")"
  if [[ -z $unit ]]; then
    fact app_restart none
    return
  fi
  fact app_unit "$unit"
  # --no-block: the unit is ordered Before= the app, so waiting here would deadlock.
  if "$SYSTEMCTL" restart --no-block "$unit"; then
    fact app_restart queued
    log info "app: restart of $unit queued"
  else
    fact app_restart failed
    log warning "app: restart of $unit failed (it may need a binding first)"
  fi
}

finish() {
  local why=$1
  mkdir -p -- "$(dirname -- "$DONE_MARKER")"
  printf 'completed %s (%s)\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$why" >"$DONE_MARKER"
  if ! "$SYSTEMCTL" disable "$UNIT" >/dev/null 2>&1; then
    log warning "could not disable $UNIT (the done marker still stops it)"
  fi
  log info "first boot complete ($why); $UNIT disabled"
}

# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

main() {
  init_settings
  if [[ -e $DONE_MARKER ]]; then
    log info "already done ($DONE_MARKER exists); nothing to do"
    return 0
  fi
  umask 077
  read_conf
  check_tools
  mkdir -p -- "$STATE_DIR" "$RUN_DIR"
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$STATE_DIR/firstboot.lock"
    flock -n 9 || die "another ctrlable-firstboot run holds $STATE_DIR/firstboot.lock"
  fi
  WORK="$(mktemp -d "$RUN_DIR/ctrlable-firstboot.XXXXXX")"
  trap cleanup EXIT
  : >"$WORK/facts"
  load_helper
  log info "first boot v$FIRSTBOOT_VERSION starting (companion $COMPANION_URL)"

  step_machine_id
  step_ssh_host_keys
  read_hostname
  read_mac
  log info "asking for the assignment of $HOSTNAME_SELF ($MAC_SELF)"

  companion GET "/api/provision/assignment?hostname=$HOSTNAME_SELF&mac=$MAC_SELF" "$WORK/assignment.json" ||
    die "could not reach the companion"
  if [[ $HTTP_STATUS == 410 ]] && step_done apply; then
    log warning "the assignment was already completed by an earlier run"
    finish "completed earlier"
    return 0
  fi
  [[ $HTTP_STATUS == 200 ]] || die "assignment refused: $(error_of "$WORK/assignment.json")"
  chmod 0600 "$WORK/assignment.json"

  local type instance_id
  py_or_die "the assignment is not valid for this guest" \
    check "$WORK/assignment.json" "$HOSTNAME_SELF" "$TEMPLATE_TYPE" >"$WORK/check.out"
  read -r type instance_id <"$WORK/check.out" || die "the assignment is not valid for this guest"
  [[ -n $type && -n $instance_id ]] || die "the assignment is not valid for this guest"
  log info "assignment: instance $instance_id, type $type"

  confirm_hostname "$HOSTNAME_SELF"
  case $type in
  freepbx) step_freepbx_identity ;;
  esac
  step_apply "$type"
  case $type in
  docker-portainer) step_portainer_admin ;;
  esac
  restart_app "$type"

  py_or_die "could not build the completion report" \
    report "$WORK/report.json" "$HOSTNAME_SELF" "$MAC_SELF" "$type" "$FIRSTBOOT_VERSION" "$WORK/facts"
  companion POST "/api/provision/complete" "$WORK/complete.out" "$WORK/report.json" ||
    die "could not report completion to the companion"
  if [[ $HTTP_STATUS == 409 && $(py error-code "$WORK/complete.out" 2>/dev/null) == already_completed ]]; then
    log warning "the companion had this completion already (an earlier answer was lost)"
  elif [[ $HTTP_STATUS != 200 ]]; then
    die "completion refused: $(error_of "$WORK/complete.out")"
  fi
  finish "instance $instance_id"
}

# The python3 helper: JSON/YAML edits and the JSON this script sends. Standard library only.
load_helper() {
  PY_HELPER="$(
    cat <<'PY'
import hashlib, json, os, re, secrets, sys, tempfile

TYPES = ("zigbee2mqtt", "zwavejs", "frigate", "docker-portainer", "freepbx")


def fail(msg):
    sys.stderr.write(msg + "\n")
    sys.exit(1)


def load(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_atomic(path, text, secret=True):
    """Replace path keeping its owner; group/world bits dropped when it holds secrets."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    try:
        st = os.stat(path)
        mode, uid, gid = st.st_mode & 0o7777, st.st_uid, st.st_gid
    except FileNotFoundError:
        mode, uid, gid = 0o600, None, None
    if secret:
        mode &= 0o700
        mode |= 0o600
    fd, tmp = tempfile.mkstemp(prefix=".ctrlable-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        if uid is not None:
            os.chown(tmp, uid, gid)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    print(path)


# --- YAML: set keys in block-style mappings, keeping every other line (comments included) ---

def _indent(line):
    return len(line) - len(line.lstrip(" "))


def _meaningful(line):
    s = line.strip()
    return bool(s) and not s.startswith("#") and not s.startswith("---")


def _block_end(lines, i, end, indent):
    j = i + 1
    while j < end:
        line = lines[j]
        if _meaningful(line) and not (
            _indent(line) > indent or (_indent(line) == indent and line.lstrip().startswith("- "))
        ):
            break
        j += 1
    while j - 1 > i and not _meaningful(lines[j - 1]):
        j -= 1
    return j


def render(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(render(v) for v in value) + "]"
    fail("cannot render %s as YAML" % type(value).__name__)


def yaml_set(text, dotted, value):
    keys = dotted.split(".")
    lines = text.split("\n")
    start, end, parent = 0, len(lines), -1
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        child = None
        for i in range(start, end):
            if _meaningful(lines[i]):
                child = _indent(lines[i])
                break
        if child is None or child <= parent:
            child = parent + 2 if parent >= 0 else 0
        pattern = re.compile("^" + " " * child + re.escape(key) + r"\s*:(\s|$)")
        found = next((i for i in range(start, end) if pattern.match(lines[i])), None)
        if found is None:
            at = start
            for i in range(start, end):
                if _meaningful(lines[i]):
                    at = i + 1
            lines.insert(at, " " * child + key + ":")
            found, end, block_end = at, end + 1, at + 1
        else:
            block_end = _block_end(lines, found, end, child)
        if last:
            lines[found] = " " * child + key + ": " + render(value)
            del lines[found + 1 : block_end]
            return "\n".join(lines)
        inline = lines[found].split(":", 1)[1].strip()
        if inline and not inline.startswith("#"):
            lines[found] = " " * child + key + ":"
            del lines[found + 1 : block_end]
            block_end = found + 1
        start, end, parent = found + 1, block_end, child
    return "\n".join(lines)


def yaml_edit(path, values):
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        fail("%s not found (is this the right template?)" % path)
    for dotted, value in values:
        text = yaml_set(text, dotted, value)
    if not text.endswith("\n"):
        text += "\n"
    write_atomic(path, text)


# --- per type -------------------------------------------------------------------------------

def apply_zigbee2mqtt(w):
    path = os.environ["CTRLABLE_Z2M_CONFIG"]
    values = []
    if w.get("mqtt"):
        m = w["mqtt"]
        values += [("mqtt.server", m["server"]), ("mqtt.user", m["user"]),
                   ("mqtt.password", m["password"]), ("mqtt.base_topic", m["base_topic"])]
    if w.get("serial"):
        values += [("serial.port", w["serial"]["port"]), ("serial.adapter", w["serial"]["adapter"])]
    n = w["network"]
    values += [("advanced.network_key", n["network_key"]), ("advanced.pan_id", n["pan_id"]),
               ("advanced.ext_pan_id", n["ext_pan_id"])]
    if "channel" in n:
        values.append(("advanced.channel", n["channel"]))
    yaml_edit(path, values)
    # State of the template's own start (it never had a coordinator); a new network starts clean.
    data = os.path.dirname(path)
    for name in ("coordinator_backup.json", "database.db", "state.json"):
        if os.path.exists(os.path.join(data, name)):
            os.unlink(os.path.join(data, name))
            print(os.path.join(data, name))


def zwave_hash(password):
    # Z-Wave JS UI's format: hex salt (8 bytes) ":" hex scrypt(password, salt, 64) (N=16384, r=8, p=1).
    salt = secrets.token_hex(8)
    key = hashlib.scrypt(password.encode(), salt=salt.encode(), n=16384, r=8, p=1, dklen=64)
    return salt + ":" + key.hex()


def set_env_line(path, name, value):
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        lines = []
    out, done = [], False
    for line in lines:
        if re.match(r"^\s*(export\s+)?" + re.escape(name) + r"=", line):
            if not done:
                out.append("%s=%s" % (name, value))
                done = True
            continue
        out.append(line)
    if not done:
        out.append("%s=%s" % (name, value))
    write_atomic(path, "\n".join(out) + "\n")


def apply_zwavejs(w):
    store = os.environ["CTRLABLE_ZWAVE_STORE"]
    settings_path = os.path.join(store, "settings.json")
    try:
        settings = load(settings_path)
    except FileNotFoundError:
        settings = {}
    if not isinstance(settings, dict):
        fail("%s is not a JSON object" % settings_path)
    zwave = settings.setdefault("zwave", {})
    if w.get("serial"):
        zwave["port"] = w["serial"]["port"]
    zwave["securityKeys"] = dict(w["security_keys"])
    zwave["securityKeysLongRange"] = dict(w["security_keys_long_range"])
    settings.setdefault("gateway", {})["authEnabled"] = True
    write_atomic(settings_path, json.dumps(settings, indent=2) + "\n")
    admin = w["admin"]
    users = [{"username": admin["username"], "passwordHash": zwave_hash(admin["password"])}]
    write_atomic(os.path.join(store, "users.json"), json.dumps(users, indent=2) + "\n")
    set_env_line(os.environ["CTRLABLE_ZWAVE_ENV"], "SESSION_SECRET", w["session_secret"])


def apply_frigate(w):
    m = w.get("mqtt")
    if not m:
        return
    yaml_edit(os.environ["CTRLABLE_FRIGATE_CONFIG"], [
        ("mqtt.enabled", True), ("mqtt.host", m["host"]), ("mqtt.port", m["port"]),
        ("mqtt.user", m["user"]), ("mqtt.password", m["password"]),
    ])


def apply_docker_portainer(w):
    # Portainer's admin is created through its API by the shell script (step_portainer_admin).
    return


_AMP = r"""(\$amp_conf\s*\[\s*['"]%s['"]\s*\]\s*=\s*)(['"])(.*?)\2(\s*;)"""


def amp_value(text, name, default):
    m = re.search(_AMP % name, text)
    return m.group(3) if m else default


def apply_freepbx(w):
    path = os.environ["CTRLABLE_FREEPBX_CONF"]
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        fail("%s not found (is this the right template?)" % path)
    new, count = re.subn(_AMP % "AMPDBPASS", lambda m: m.group(1) + "'" + w["db_password"] + "'" + m.group(4), text)
    if count != 1:
        fail("%s: expected one $amp_conf['AMPDBPASS'] line, found %d" % (path, count))
    write_atomic(path, new)
    amportal = os.environ["CTRLABLE_AMPORTAL_CONF"]
    if os.path.exists(amportal):
        with open(amportal, encoding="utf-8") as fh:
            text = fh.read()
        new, count = re.subn(r"(?m)^(AMPDBPASS\s*=).*$", lambda m: m.group(1) + w["db_password"], text)
        if count:
            write_atomic(amportal, new)
    odbc = os.environ["CTRLABLE_ODBC_CONF"]
    if os.path.exists(odbc):
        with open(odbc, encoding="utf-8") as fh:
            text = fh.read()
        new, count = re.subn(r"(?m)^(\s*password\s*=>\s*).*$", lambda m: m.group(1) + w["db_password"], text)
        if count:
            write_atomic(odbc, new)


def freepbx_sql(assignment_path, out):
    w = load(assignment_path)["wiring"]
    path = os.environ["CTRLABLE_FREEPBX_CONF"]
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        fail("%s not found (is this the right template?)" % path)
    user = amp_value(text, "AMPDBUSER", "freepbxuser")
    dbname = amp_value(text, "AMPDBNAME", "asterisk")
    for what, value in (("AMPDBUSER", user), ("AMPDBNAME", dbname)):
        if not re.match(r"^[A-Za-z0-9_]{1,64}$", value):
            fail("%s: %s %r is not a plain name" % (path, what, value))
    for value in (w["db_password"], w["admin"]["password"], w["admin"]["username"]):
        if not re.match(r"^[A-Za-z0-9]{1,128}$", value):
            fail("freepbx: the assignment's credentials are not plain letters and digits")
    sha1 = hashlib.sha1(w["admin"]["password"].encode()).hexdigest()
    sql = (
        "ALTER USER '%s'@'localhost' IDENTIFIED BY '%s';\n"
        "INSERT INTO `%s`.ampusers (username, password_sha1, extension_low, extension_high, deptname, sections)"
        " VALUES ('%s', '%s', '', '', '', '*')"
        " ON DUPLICATE KEY UPDATE password_sha1 = VALUES(password_sha1), sections = '*';\n"
        "FLUSH PRIVILEGES;\n"
    ) % (user, w["db_password"], dbname, w["admin"]["username"], sha1)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(sql)


def portainer_body(assignment_path, out):
    p = load(assignment_path)["wiring"]["portainer"]
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"Username": p["username"], "Password": p["password"]}, fh)


def check(assignment_path, hostname, template_type):
    a = load(assignment_path)
    if not isinstance(a, dict) or a.get("version") != 1:
        fail("assignment: unknown format (version %r)" % (a.get("version") if isinstance(a, dict) else None))
    if a.get("hostname") != hostname:
        fail("assignment: it is for %r, this guest is %r" % (a.get("hostname"), hostname))
    if a.get("type") not in TYPES:
        fail("assignment: unknown type %r" % a.get("type"))
    if template_type and a["type"] != template_type:
        fail("assignment: type %s does not match this template (%s)" % (a["type"], template_type))
    if not isinstance(a.get("wiring"), dict) or not isinstance(a.get("instance_id"), int):
        fail("assignment: wiring or instance_id missing")
    print(a["type"], a["instance_id"])


def report(out, hostname, mac, type_, version, facts_path):
    body = {"hostname": hostname, "mac": mac, "status": "ok", "type": type_,
            "script_version": version, "ssh_host_keys": [], "changed_files": []}
    multi = {"ssh_host_key": "ssh_host_keys", "changed_file": "changed_files"}
    with open(facts_path, encoding="utf-8") as fh:
        for line in fh:
            key, _, value = line.rstrip("\n").partition("=")
            if value in ("true", "false"):
                value = value == "true"
            if key in multi:
                body[multi[key]].append(value)
            else:
                body[key] = value
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(body, fh)


def error(path, code_only=False):
    try:
        e = load(path)["error"]
    except Exception:
        sys.exit(1)
    print(e.get("code") if code_only else "%s: %s" % (e.get("code"), e.get("message")))


def main(argv):
    cmd = argv[0]
    if cmd == "apply":
        type_, w = argv[1], load(argv[2])["wiring"]
        {"zigbee2mqtt": apply_zigbee2mqtt, "zwavejs": apply_zwavejs, "frigate": apply_frigate,
         "docker-portainer": apply_docker_portainer, "freepbx": apply_freepbx}[type_](w)
    elif cmd == "check":
        check(argv[1], argv[2], argv[3] if len(argv) > 3 else "")
    elif cmd == "portainer-body":
        portainer_body(argv[1], argv[2])
    elif cmd == "freepbx-sql":
        freepbx_sql(argv[1], argv[2])
    elif cmd == "report":
        report(*argv[1:7])
    elif cmd == "error":
        error(argv[1])
    elif cmd == "error-code":
        error(argv[1], code_only=True)
    else:
        fail("unknown helper command %r" % cmd)


main(sys.argv[1:])
PY
  )"
}

main "$@"
