#!/usr/bin/env bash
# install.sh: one-shot bootstrap of a Proxmox VE host for Ctrlable Provisioner.
#
# Run as root on the PVE host, from the checkout or unpacked release tarball. It creates the
# least-privilege PVE role/user/token, the orchestrator LXC with the companion service inside,
# and the restricted SSH path for template builds. Re-running it upgrades in place and changes
# nothing that is already right. `install.sh --help` lists options and exit codes; docs/install.md
# is the dealer's guide.
set -Eeuo pipefail

# ---------------------------------------------------------------------------------------------
# Exit codes (documented in --help; tests rely on them)
readonly E_INTERNAL=1 E_USAGE=2 E_NOT_ROOT=3 E_PVE=4 E_ARCH=5 E_STORAGE=6 E_TEMPLATE=7
readonly E_ACCESS=8 E_CT=9 E_COMPANION=10 E_HOST=11 E_TOOLS=12

# PVE access (docs: shared reference proxmox-api.md section 8)
readonly ROLE="CtrlableProvisioner"
readonly BASE_PRIVS="VM.Audit VM.Clone VM.Allocate VM.Config.Network VM.Config.Options VM.PowerMgmt Datastore.AllocateSpace Datastore.Audit Sys.Audit SDN.Use"
# Plus the guest-agent read the HAOS flow needs to find the ctrlable-pro VM's address: PVE 8 checks
# VM.Monitor for agent calls; PVE 9 removed VM.Monitor and checks VM.GuestAgent.Audit instead.
# Set by check_pve_version.
PRIVS="$BASE_PRIVS"
readonly PVE_USER="ctrlable@pve"
readonly TOKEN_NAME="provisioner"
readonly TOKEN_ID="${PVE_USER}!${TOKEN_NAME}"

# The orchestrator container and what lives in it
readonly CT_TAG="ctrlable-orchestrator"
readonly CT_USER="ctrlable"
readonly CT_APP_DIR="/opt/ctrlable"
readonly CT_SRC="/opt/ctrlable/src"
readonly CT_VENV="/opt/ctrlable/venv"
readonly CT_STAMP="/opt/ctrlable/SOURCE_SHA256"
readonly CT_ETC="/etc/ctrlable"
readonly CT_ENV="/etc/ctrlable/.env"
readonly CT_KEY="/etc/ctrlable/build_ed25519"
readonly CT_KNOWN_HOSTS="/etc/ctrlable/known_hosts"
readonly CT_DATA="/var/lib/ctrlable"
readonly CT_UNIT_NAME="ctrlable-companion.service"
readonly CT_UNIT="/etc/systemd/system/ctrlable-companion.service"

# The build path on the host
readonly BUILD_WRAPPER="/usr/local/sbin/ctrlable-build"
readonly AUTH_OPTS="command=\"${BUILD_WRAPPER}\",no-pty,no-port-forwarding,no-agent-forwarding,no-X11-forwarding"
readonly KEY_COMMENT="ctrlable-orchestrator"

readonly MIN_PVE_MAJOR=8 MIN_PVE_MINOR=2
readonly STATE_KEYS="CTID HOSTNAME STORAGE TEMPLATE_STORAGE BRIDGE IP GW VLAN CORES MEMORY SWAP DISK PVE_HOST PORT SITE_ID PLATFORM_URL PLATFORM_TOKEN API_TOKEN FIRSTBOOT_SECRET PVE_TOKEN_SECRET"

# ---------------------------------------------------------------------------------------------
# Globals (set by parse_args / the steps)
ACTION="install"
DRY_RUN=0
PURGE_DATA=0
OPT_CTID="" OPT_HOSTNAME="" OPT_STORAGE="" OPT_TEMPLATE_STORAGE="" OPT_TEMPLATE="" OPT_BRIDGE=""
OPT_IP="" OPT_GW="" OPT_VLAN="" OPT_CORES="" OPT_MEMORY="" OPT_SWAP="" OPT_DISK="" OPT_PVE_HOST=""
OPT_PORT="" OPT_SITE_ID="" OPT_PLATFORM_URL="" OPT_PLATFORM_TOKEN_FILE="" OPT_SOURCE=""
API_TOKEN="" FIRSTBOOT_SECRET="" PVE_TOKEN_SECRET="" PLATFORM_TOKEN=""
SRC_DIR="" SRC_HASH="" ARCH_DEB="" PVE_VERSION="" PVE_FINGERPRINT="" HOST_KEY_LINE=""
CT_EXISTS=0 CT_IP="" COMPANION_UPDATED=0 USER_PLANNED=0 TEMPLATE_VOLID="" OUT="" TMP="" CHANGES=0 SYNC_CHANGED=0
ROOT="" H_ETC="" H_STATE="" H_SHARE="" H_BUILD_CONF="" H_TOKEN_FILE="" H_KEY="" H_AUTH_KEYS="" H_HOST_KEY="" H_WRAPPER="" H_BACKUP_DIR=""
POLL_SECONDS=2 POLL_TRIES=60
declare -A CTCONF=()

# ---------------------------------------------------------------------------------------------
# Output helpers. Messages go to stderr; the final summary goes to stdout.
step() { printf '==> %s\n' "$*" >&2; }
note() { printf '    %s\n' "$*" >&2; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() {
  local code=$1
  shift
  printf 'install.sh: error: %s\n' "$*" >&2
  exit "$code"
}

on_err() {
  local rc=$? line=$1 cmd=$2
  if ((BASH_SUBSHELL > 0)); then exit "$rc"; fi
  printf 'install.sh: unexpected failure (exit %s) at line %s: %s\n' "$rc" "$line" "$cmd" >&2
  exit "$E_INTERNAL"
}

cleanup() {
  if [[ -n $TMP && -d $TMP ]]; then rm -rf -- "$TMP"; fi
}

usage() {
  cat <<'EOF'
Usage: install.sh [OPTIONS]
       install.sh --uninstall [--purge-data] [--ctid N]

Bootstraps a Proxmox VE (>= 8.2) host for Ctrlable Provisioner, as root:
  * PVE role CtrlableProvisioner (least privilege), user ctrlable@pve and a
    privilege-separated API token ctrlable@pve!provisioner, with ACLs on / for both;
  * the orchestrator LXC (Debian 12, unprivileged) running the companion service
    (ctrlable-companion.service, venv in /opt/ctrlable/venv, settings /etc/ctrlable/.env);
  * /usr/local/sbin/ctrlable-build and the orchestrator's SSH key in root's
    authorized_keys, restricted to that command; the host key pinned in the companion.
Re-running upgrades the companion in place and keeps the database and secrets.
Options not given on a re-run keep the values of the previous run.

Container:
  --ctid N               container id (default: next free id)
  --hostname NAME        container hostname (default: ctrlable)
  --storage ID           storage for the container disk (default: local-lvm, local-zfs or
                         the first storage that holds containers)
  --template-storage ID  storage for the Debian 12 template (default: local)
  --template VOLID       use this template instead of the newest debian-12-standard
  --cores N              CPU cores (default: 2)
  --memory MIB           memory in MiB (default: 1024)
  --swap MIB             swap in MiB (default: 512)
  --disk GIB             disk size in GiB (default: 8)
Network:
  --bridge BR            bridge (default: vmbr0)
  --ip CIDR|dhcp         static IPv4 address with prefix (e.g. 192.168.1.50/24) or dhcp
                         (default: dhcp; use a DHCP reservation so the URL stays valid)
  --gw ADDR              IPv4 gateway (required with a static --ip)
  --vlan TAG             VLAN tag (1-4094) on the container's interface
  --pve-host ADDR        address the container uses to reach this host's API and SSH
                         (default: the bridge's IPv4 address)
Companion:
  --port N               companion HTTP port (default: 8580)
  --site-id ID           site id reported to the platform (default: this node's name)
  --platform-url URL     Ctrlable management platform URL (optional)
  --platform-token-file FILE
                         file holding the platform token (kept out of the process list)
  --source DIR           checkout or unpacked release to install (default: this script's
                         directory)
Modes:
  --dry-run              print what would be done; change nothing
  --uninstall            remove the container, PVE role/user/token/ACLs, the build wrapper
                         and the authorized_keys entry. The companion's data directory
                         (database, secret store) is saved to /var/lib/ctrlable/backup on
                         the host first, and restored by the next install.
  --purge-data           with --uninstall: also delete that backup and /etc/ctrlable
  -h, --help             show this help

Exit codes:
  0  success (or nothing to do)
  1  unexpected internal error (the message names the failing line)
  2  bad command line
  3  not running as root
  4  not a Proxmox VE host, or Proxmox VE older than 8.2
  5  unsupported CPU architecture (x86_64 and aarch64 are supported)
  6  storage missing, inactive, unable to hold containers, or too full
  7  Debian 12 template not available or download failed
  8  PVE role/user/token/ACL setup (pveum) failed
  9  container create/configure/start failed, or the id belongs to something else
 10  installing or starting the companion inside the container failed
 11  host files (source tree, SSH host key, certificate, SSH key, authorized_keys) problem
 12  a required command is missing

Environment (for tests and unusual layouts):
  CTRLABLE_ROOT=DIR                    prefix for every host path (/etc, /root, /usr/local)
  CTRLABLE_INSTALL_ALLOW_NONROOT=1     skip the root check
  CTRLABLE_INSTALL_POLL_SECONDS=N      pause between readiness polls (default 2)
  CTRLABLE_INSTALL_POLL_TRIES=N        readiness polls before giving up (default 60)
EOF
}

# ---------------------------------------------------------------------------------------------
# Command line

need_value() {
  if [[ $# -lt 2 || -z $2 ]]; then die "$E_USAGE" "$1 needs a value (see --help)"; fi
}

parse_args() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --uninstall) ACTION="uninstall" ;;
      --purge-data) PURGE_DATA=1 ;;
      --ctid | --hostname | --storage | --template-storage | --template | --bridge | --ip | --gw | \
        --vlan | --cores | --memory | --swap | --disk | --pve-host | --port | --site-id | \
        --platform-url | --platform-token-file | --source)
        need_value "$@"
        local var="OPT_${1#--}"
        var="${var//-/_}"
        printf -v "${var^^}" '%s' "$2"
        shift
        ;;
      *) die "$E_USAGE" "unknown option '$1' (see --help)" ;;
    esac
    shift
  done
  if ((PURGE_DATA)) && [[ $ACTION != uninstall ]]; then
    die "$E_USAGE" "--purge-data only makes sense with --uninstall"
  fi
}

check_int() { # NAME VALUE MIN MAX
  if ! [[ $2 =~ ^[0-9]+$ ]] || (($2 < $3 || $2 > $4)); then
    die "$E_USAGE" "$1: must be an integer from $3 to $4 (got '$2')"
  fi
}

check_re() { # NAME VALUE REGEX WHAT
  if ! [[ $2 =~ $3 ]]; then die "$E_USAGE" "$1: $4 (got '$2')"; fi
}

readonly RE_IPV4='^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$'
readonly RE_DNS='^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$'
readonly RE_STORAGE='^[A-Za-z][A-Za-z0-9_.-]*$'
readonly RE_SAFE_VALUE='^[A-Za-z0-9_.:/@!%+=,~-]*$'

# Resolve an option: command line, else the previous run's value, else the default.
resolve() { # NAME DEFAULT
  local opt="OPT_$1" saved="SAVED_$1"
  if [[ -z ${!opt} ]]; then printf -v "$opt" '%s' "${!saved:-$2}"; fi
}

resolve_options() {
  resolve CTID ""
  resolve HOSTNAME "ctrlable"
  resolve STORAGE ""
  resolve TEMPLATE_STORAGE "local"
  resolve BRIDGE "vmbr0"
  if [[ -z $OPT_IP ]]; then
    OPT_IP="${SAVED_IP:-dhcp}"
    if [[ -z $OPT_GW ]]; then OPT_GW="${SAVED_GW:-}"; fi
  fi
  resolve VLAN ""
  resolve CORES 2
  resolve MEMORY 1024
  resolve SWAP 512
  resolve DISK 8
  resolve PVE_HOST ""
  resolve PORT 8580
  resolve SITE_ID ""
  resolve PLATFORM_URL ""

  if [[ -n $OPT_CTID ]]; then check_int --ctid "$OPT_CTID" 100 999999999; fi
  check_re --hostname "$OPT_HOSTNAME" "$RE_DNS" "must be a DNS label (letters, digits, '-')"
  if [[ -n $OPT_STORAGE ]]; then check_re --storage "$OPT_STORAGE" "$RE_STORAGE" "not a storage id"; fi
  check_re --template-storage "$OPT_TEMPLATE_STORAGE" "$RE_STORAGE" "not a storage id"
  if [[ -n $OPT_TEMPLATE ]]; then
    check_re --template "$OPT_TEMPLATE" '^[A-Za-z][A-Za-z0-9_.-]*:vztmpl/[A-Za-z0-9_.+-]+$' \
      "must be a volume id like local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"
  fi
  check_re --bridge "$OPT_BRIDGE" '^[A-Za-z][A-Za-z0-9_.-]{0,14}$' "not a bridge name"
  if [[ $OPT_IP == dhcp ]]; then
    OPT_GW=""
  else
    check_re --ip "$OPT_IP" '^[0-9.]+/([0-9]|[12][0-9]|3[0-2])$' "must be 'dhcp' or an IPv4 address with prefix, e.g. 192.168.1.50/24"
    check_re --ip "${OPT_IP%/*}" "$RE_IPV4" "not an IPv4 address"
    if [[ -z $OPT_GW ]]; then die "$E_USAGE" "--gw: required with a static --ip"; fi
    check_re --gw "$OPT_GW" "$RE_IPV4" "not an IPv4 address"
  fi
  if [[ -n $OPT_VLAN ]]; then check_int --vlan "$OPT_VLAN" 1 4094; fi
  check_int --cores "$OPT_CORES" 1 128
  check_int --memory "$OPT_MEMORY" 512 262144
  check_int --swap "$OPT_SWAP" 0 262144
  check_int --disk "$OPT_DISK" 4 4096
  check_int --port "$OPT_PORT" 1 65535
  if [[ -n $OPT_PVE_HOST ]] && ! [[ $OPT_PVE_HOST =~ $RE_IPV4 ]]; then
    check_re --pve-host "$OPT_PVE_HOST" '^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$' "not an IPv4 address or host name"
  fi
  if [[ -z $OPT_SITE_ID ]]; then
    OPT_SITE_ID="$(hostname -s 2>/dev/null | tr -c 'A-Za-z0-9._\n-' '-' | cut -c1-64)"
    OPT_SITE_ID="${OPT_SITE_ID:-site-1}"
  fi
  check_re --site-id "$OPT_SITE_ID" '^[A-Za-z0-9._-]{1,64}$' "1-64 letters, digits, '.', '_' or '-'"
  if [[ -n $OPT_PLATFORM_URL ]]; then
    check_re --platform-url "$OPT_PLATFORM_URL" '^https?://[A-Za-z0-9.:/_%~+-]+$' "must be an http(s) URL"
  fi
  PLATFORM_TOKEN="${SAVED_PLATFORM_TOKEN:-}"
  if [[ -n $OPT_PLATFORM_TOKEN_FILE ]]; then
    [[ -r $OPT_PLATFORM_TOKEN_FILE ]] || die "$E_USAGE" "--platform-token-file: cannot read '$OPT_PLATFORM_TOKEN_FILE'"
    PLATFORM_TOKEN="$(head -n 1 -- "$OPT_PLATFORM_TOKEN_FILE" | tr -d '[:space:]')"
    check_re --platform-token-file "$PLATFORM_TOKEN" '^[A-Za-z0-9_.~+/=-]+$' "token must be one line of URL-safe characters"
  fi
}

# ---------------------------------------------------------------------------------------------
# Paths, state file

init_paths() {
  ROOT="${CTRLABLE_ROOT:-}"
  ROOT="${ROOT%/}"
  H_ETC="$ROOT/etc/ctrlable"
  H_STATE="$H_ETC/install.env"
  H_KEY="$H_ETC/orchestrator_ed25519"
  H_AUTH_KEYS="$ROOT/root/.ssh/authorized_keys"
  H_HOST_KEY="$ROOT/etc/ssh/ssh_host_ed25519_key.pub"
  H_WRAPPER="$ROOT$BUILD_WRAPPER"
  H_BACKUP_DIR="$ROOT/var/lib/ctrlable/backup"
  H_SHARE="$ROOT/usr/local/share/ctrlable-build"
  H_BUILD_CONF="$H_ETC/ctrlable-build.conf"
  H_TOKEN_FILE="$H_ETC/companion-token"
  POLL_SECONDS="${CTRLABLE_INSTALL_POLL_SECONDS:-2}"
  POLL_TRIES="${CTRLABLE_INSTALL_POLL_TRIES:-60}"
  check_int CTRLABLE_INSTALL_POLL_SECONDS "$POLL_SECONDS" 0 60
  check_int CTRLABLE_INSTALL_POLL_TRIES "$POLL_TRIES" 1 10000
}

# The state file holds the options of the last run and the secrets (root-only, 0600).
# It is parsed, never sourced.
load_state() {
  local key value line
  for key in $STATE_KEYS; do printf -v "SAVED_$key" '%s' ""; done
  [[ -f $H_STATE ]] || return 0
  while IFS= read -r line || [[ -n $line ]]; do
    [[ -z $line || $line == \#* ]] && continue
    key="${line%%=*}"
    value="${line#*=}"
    if [[ $line != *=* || " $STATE_KEYS " != *" $key "* ]]; then
      die "$E_HOST" "$H_STATE: unexpected line '${key}' (remove it or the file)"
    fi
    printf -v "SAVED_$key" '%s' "$value"
  done <"$H_STATE"
}

render_state() {
  printf '# Written by install.sh: the options of the last run and the secrets it made.\n'
  printf '# Root only (0600). Keep it: a re-run reuses these values.\n'
  printf 'CTID=%s\nHOSTNAME=%s\nSTORAGE=%s\nTEMPLATE_STORAGE=%s\n' \
    "$OPT_CTID" "$OPT_HOSTNAME" "$OPT_STORAGE" "$OPT_TEMPLATE_STORAGE"
  printf 'BRIDGE=%s\nIP=%s\nGW=%s\nVLAN=%s\n' "$OPT_BRIDGE" "$OPT_IP" "$OPT_GW" "$OPT_VLAN"
  printf 'CORES=%s\nMEMORY=%s\nSWAP=%s\nDISK=%s\n' "$OPT_CORES" "$OPT_MEMORY" "$OPT_SWAP" "$OPT_DISK"
  printf 'PVE_HOST=%s\nPORT=%s\nSITE_ID=%s\nPLATFORM_URL=%s\n' \
    "$OPT_PVE_HOST" "$OPT_PORT" "$OPT_SITE_ID" "$OPT_PLATFORM_URL"
  printf 'PLATFORM_TOKEN=%s\nAPI_TOKEN=%s\nFIRSTBOOT_SECRET=%s\nPVE_TOKEN_SECRET=%s\n' \
    "$PLATFORM_TOKEN" "$API_TOKEN" "$FIRSTBOOT_SECRET" "$PVE_TOKEN_SECRET"
}

save_state() {
  ((DRY_RUN)) && return 0
  render_state >"$TMP/state.new"
  if [[ -f $H_STATE ]] && cmp -s "$TMP/state.new" "$H_STATE"; then return 0; fi
  install -d -m 0700 "$H_ETC"
  install -m 0600 "$TMP/state.new" "$H_STATE.tmp"
  mv -f "$H_STATE.tmp" "$H_STATE"
}

# ---------------------------------------------------------------------------------------------
# Running commands

quote_cmd() {
  local out="" arg
  for arg in "$@"; do out+="$(printf '%q' "$arg") "; done
  printf '%s' "${out% }"
}

# capture CODE WHAT CMD...: run a read-only command; stdout in OUT; die with CODE on failure.
capture() {
  local code=$1 what=$2 rc=0
  shift 2
  OUT=$("$@" 2>"$TMP/stderr") || rc=$?
  if ((rc != 0)); then
    die "$code" "$what failed (exit $rc): $(tail -n 5 "$TMP/stderr" | tr '\n' ' ')"
  fi
}

# mutate CODE WHAT CMD...: run a command that changes something (printed only with --dry-run).
mutate() {
  local code=$1 what=$2
  shift 2
  CHANGES=$((CHANGES + 1))
  if ((DRY_RUN)); then
    note "would run: $(quote_cmd "$@")"
    OUT=""
    return 0
  fi
  note "$what"
  capture "$code" "$what" "$@"
}

# Parse JSON in OUT with a perl expression ($d is the decoded document, @ARGV the args).
json() {
  local code=$1
  shift
  printf '%s' "$OUT" | perl -MJSON::PP -e 'my $d = JSON::PP->new->decode(do { local $/; <STDIN> } || "null");'"$code" -- "$@"
}

# Normalize a privilege list (space or comma separated) to sorted, one space apart.
norm_privs() {
  printf '%s\n' "$1" | sed 's/[, ]/\n/g' | sed '/^$/d' | sort -u | tr '\n' ' ' | sed 's/ $//'
}

sleep_poll() {
  if ((POLL_SECONDS > 0)); then sleep "$POLL_SECONDS"; fi
}

# ---------------------------------------------------------------------------------------------
# Preflight (read-only)

check_root() {
  if [[ $(id -u) -ne 0 && ${CTRLABLE_INSTALL_ALLOW_NONROOT:-0} != 1 ]]; then
    die "$E_NOT_ROOT" "run install.sh as root on the Proxmox VE host (e.g. sudo ./install.sh)"
  fi
}

check_tools() {
  local tool
  if ! command -v pveversion >/dev/null 2>&1; then
    die "$E_PVE" "pveversion not found: this is not a Proxmox VE host"
  fi
  for tool in pveum pct pveam pvesm pvesh; do
    command -v "$tool" >/dev/null 2>&1 || die "$E_PVE" "$tool not found: this Proxmox VE installation is incomplete"
  done
  for tool in openssl ssh-keygen tar gzip sha256sum perl install cmp awk sed timeout; do
    command -v "$tool" >/dev/null 2>&1 || die "$E_TOOLS" "required command '$tool' is missing (apt-get install it)"
  done
}

check_pve_version() {
  capture "$E_PVE" "pveversion" pveversion
  local re='pve-manager/([0-9]+)\.([0-9]+)(\.[0-9]+)?'
  if ! [[ $OUT =~ $re ]]; then
    die "$E_PVE" "cannot read the Proxmox VE version from pveversion: '${OUT%%$'\n'*}'"
  fi
  local major=${BASH_REMATCH[1]} minor=${BASH_REMATCH[2]}
  PVE_VERSION="$major.$minor${BASH_REMATCH[3]}"
  if ((major < MIN_PVE_MAJOR || (major == MIN_PVE_MAJOR && minor < MIN_PVE_MINOR))); then
    die "$E_PVE" "Proxmox VE $PVE_VERSION is too old: $MIN_PVE_MAJOR.$MIN_PVE_MINOR or newer is required (upgrade the host first)"
  fi
  if ((major >= 9)); then
    PRIVS="$BASE_PRIVS VM.GuestAgent.Audit"
  else
    PRIVS="$BASE_PRIVS VM.Monitor"
  fi
  note "Proxmox VE $PVE_VERSION"
}

check_arch() {
  local machine
  machine="$(uname -m)"
  case "$machine" in
    x86_64) ARCH_DEB="amd64" ;;
    aarch64 | arm64) ARCH_DEB="arm64" ;;
    *) die "$E_ARCH" "unsupported architecture '$machine': x86_64 or aarch64 is required" ;;
  esac
  note "architecture $machine ($ARCH_DEB)"
}

check_source() {
  SRC_DIR="${OPT_SOURCE:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
  [[ -d $SRC_DIR ]] || die "$E_HOST" "--source: '$SRC_DIR' is not a directory"
  SRC_DIR="$(cd "$SRC_DIR" && pwd)"
  local item
  for item in pyproject.toml README.md companion/__init__.py companion/cli.py releases \
    deploy/ctrlable-companion.service host/ctrlable-build firstboot/ctrlable-firstboot.sh \
    firstboot/ctrlable-firstboot.service; do
    [[ -e $SRC_DIR/$item ]] || die "$E_HOST" "source tree $SRC_DIR is incomplete: $item is missing"
  done
  if ! grep -q '^ctrlable-companion *= *"companion.cli:' "$SRC_DIR/pyproject.toml"; then
    die "$E_HOST" "$SRC_DIR/pyproject.toml does not declare the ctrlable-companion console script"
  fi
}

check_host_files() {
  [[ -f $H_HOST_KEY ]] || die "$E_HOST" "host SSH key $H_HOST_KEY is missing; the companion pins it (no trust on first use). Run 'ssh-keygen -A' on the host."
  local type blob
  read -r type blob _ <"$H_HOST_KEY" || true
  if [[ $type != ssh-ed25519 || -z $blob ]]; then
    die "$E_HOST" "$H_HOST_KEY is not an ssh-ed25519 public key"
  fi
  HOST_KEY_LINE="$type $blob"
  read_fingerprint
}

read_fingerprint() {
  local pem fp=""
  for pem in "$ROOT/etc/pve/local/pveproxy-ssl.pem" "$ROOT/etc/pve/local/pve-ssl.pem"; do
    if [[ -f $pem ]]; then
      capture "$E_HOST" "reading the certificate $pem" openssl x509 -in "$pem" -noout -fingerprint -sha256
      fp="${OUT#*=}"
      break
    fi
  done
  if [[ -z $fp ]]; then
    capture "$E_HOST" "pvenode cert info" pvenode cert info --output-format json
    # shellcheck disable=SC2016  # perl code
    fp="$(json 'my %f = map { ($_->{filename} // "") => ($_->{fingerprint} // "") } @$d; print $f{"pveproxy-ssl.pem"} || $f{"pve-ssl.pem"} || "";')"
  fi
  fp="${fp^^}"
  if ! [[ $fp =~ ^([0-9A-F]{2}:){31}[0-9A-F]{2}$ ]]; then
    die "$E_HOST" "cannot determine the SHA-256 fingerprint of this host's API certificate (/etc/pve/local/pve-ssl.pem)"
  fi
  PVE_FINGERPRINT="$fp"
}

detect_pve_host() {
  if [[ -n $OPT_PVE_HOST ]]; then return 0; fi
  local out addr
  if ! out="$(ip -4 -o addr show dev "$OPT_BRIDGE" 2>/dev/null)"; then
    die "$E_HOST" "cannot read the IPv4 address of bridge $OPT_BRIDGE; pass --pve-host ADDR"
  fi
  addr="$(awk '{ for (i = 1; i < NF; i++) if ($i == "inet") { print $(i + 1); exit } }' <<<"$out")"
  addr="${addr%%/*}"
  [[ $addr =~ $RE_IPV4 ]] || die "$E_HOST" "bridge $OPT_BRIDGE has no IPv4 address; pass --pve-host ADDR"
  OPT_PVE_HOST="$addr"
}

# Storage rows (name type status total used avail, KiB) with the given content type.
storage_rows() {
  capture "$E_STORAGE" "pvesm status" pvesm status --content "$1"
  OUT="$(awk 'NR > 1 && NF >= 6 { print $1, $2, $3, $4, $5, $6 }' <<<"$OUT")"
}

check_storage() {
  local rows name type status avail names
  storage_rows rootdir
  rows="$OUT"
  [[ -n $rows ]] || die "$E_STORAGE" "no storage on this host can hold containers (content 'rootdir'); add one under Datacenter > Storage"
  names="$(awk '{ print $1 }' <<<"$rows" | tr '\n' ' ')"
  if [[ -z $OPT_STORAGE ]]; then
    for name in local-lvm local-zfs; do
      if awk -v n="$name" '$1 == n && $3 == "active" { f = 1 } END { exit !f }' <<<"$rows"; then
        OPT_STORAGE="$name"
        break
      fi
    done
    if [[ -z $OPT_STORAGE ]]; then
      OPT_STORAGE="$(awk '$3 == "active" { print $1; exit }' <<<"$rows")"
    fi
    [[ -n $OPT_STORAGE ]] || die "$E_STORAGE" "no active storage can hold containers (found: ${names% })"
  fi
  if ! read -r name type status _ _ avail < <(awk -v n="$OPT_STORAGE" '$1 == n' <<<"$rows"); then
    die "$E_STORAGE" "storage '$OPT_STORAGE' does not exist or cannot hold containers; usable: ${names% }"
  fi
  [[ $status == active ]] || die "$E_STORAGE" "storage '$OPT_STORAGE' is $status, not active"
  if ((CT_EXISTS == 0)); then
    local need=$((OPT_DISK * 1024 * 1024))
    if ((avail < need)); then
      die "$E_STORAGE" "storage '$OPT_STORAGE' has $((avail / 1024 / 1024)) GiB free; the orchestrator needs $OPT_DISK GiB (--disk)"
    fi
  fi
  note "container storage $OPT_STORAGE ($type, $((avail / 1024 / 1024)) GiB free)"

  storage_rows vztmpl
  if ! awk -v n="$OPT_TEMPLATE_STORAGE" '$1 == n && $3 == "active" { f = 1 } END { exit !f }' <<<"$OUT"; then
    die "$E_STORAGE" "storage '$OPT_TEMPLATE_STORAGE' cannot hold templates (content 'vztmpl') or is inactive; pass --template-storage"
  fi
}

# ---------------------------------------------------------------------------------------------
# The container: discovery, reading and writing its files

ct_listed() { # CTID -> 0 if pct list shows it
  capture "$E_CT" "pct list" pct list
  awk -v id="$1" 'NR > 1 && $1 == id { f = 1 } END { exit !f }' <<<"$OUT"
}

read_ct_config() {
  capture "$E_CT" "pct config $OPT_CTID" pct config "$OPT_CTID"
  CTCONF=()
  local line key
  while IFS= read -r line; do
    [[ $line == *": "* ]] || continue
    key="${line%%: *}"
    CTCONF[$key]="${line#*: }"
  done <<<"$OUT"
}

ct_is_ours() {
  local tags=";${CTCONF[tags]:-};"
  tags="${tags//,/;}"
  tags="${tags// /;}"
  [[ $tags == *";$CT_TAG;"* ]]
}

discover_ct() {
  CT_EXISTS=0
  capture "$E_CT" "pvesh get /cluster/resources" pvesh get /cluster/resources --type vm --output-format json
  local found
  # shellcheck disable=SC2016  # perl code
  found="$(json 'for (@$d) { next unless ($_->{type} // "") eq "lxc"; my %t = map { $_ => 1 } split /[;, ]+/, ($_->{tags} // ""); print "$_->{vmid}\n" if $t{$ARGV[0]}; }' "$CT_TAG")"
  if [[ -n $OPT_CTID && -n $found ]] && ! grep -qx -- "$OPT_CTID" <<<"$found"; then
    die "$E_CT" "the orchestrator already exists as CT $(tr '\n' ' ' <<<"$found")(tag $CT_TAG); one host runs one orchestrator: drop --ctid, or --uninstall first"
  fi
  if [[ -z $OPT_CTID ]]; then
    if [[ $(wc -w <<<"$found") -gt 1 ]]; then
      die "$E_CT" "several containers carry the tag $CT_TAG ($(tr '\n' ' ' <<<"$found")); pass --ctid"
    fi
    OPT_CTID="${found//[^0-9]/}"
    [[ -n $OPT_CTID ]] || return 0
    note "found the orchestrator container $OPT_CTID (tag $CT_TAG)"
  fi
  if ct_listed "$OPT_CTID"; then
    read_ct_config
    ct_is_ours || die "$E_CT" "CT/VM $OPT_CTID exists and is not the Ctrlable orchestrator (no tag $CT_TAG); choose another --ctid"
    CT_EXISTS=1
  fi
}

ct_running() {
  capture "$E_CT" "pct status $OPT_CTID" pct status "$OPT_CTID"
  [[ $OUT == *"status: running"* ]]
}

# ct_fetch PATH DEST: copy a file out of the container; 1 if it does not exist.
ct_fetch() {
  rm -f -- "$2"
  pct pull "$OPT_CTID" "$1" "$2" >/dev/null 2>&1 && [[ -f $2 ]]
}

# ct_exec CODE WHAT CMD...: run a changing command in the container.
ct_exec() {
  local code=$1 what=$2
  shift 2
  mutate "$code" "$what" pct exec "$OPT_CTID" -- "$@"
}

# ct_sync LOCAL PATH PERMS OWNER: push LOCAL to PATH unless the container already has it.
ct_sync() {
  local src=$1 path=$2 perms=$3 owner=$4
  SYNC_CHANGED=0
  if ((CT_EXISTS)) && ct_fetch "$path" "$TMP/pulled" && cmp -s "$src" "$TMP/pulled"; then
    return 0
  fi
  SYNC_CHANGED=1
  mutate "$E_COMPANION" "writing $path in CT $OPT_CTID" \
    pct push "$OPT_CTID" "$src" "$path" --perms "$perms" --user "$owner" --group "$owner"
}

# ---------------------------------------------------------------------------------------------
# Steps

ensure_secrets() {
  API_TOKEN="${SAVED_API_TOKEN:-}"
  FIRSTBOOT_SECRET="${SAVED_FIRSTBOOT_SECRET:-}"
  PVE_TOKEN_SECRET="${SAVED_PVE_TOKEN_SECRET:-}"
  if [[ -z $API_TOKEN ]] && ((CT_EXISTS && !DRY_RUN)) && ! ct_running; then
    mutate "$E_CT" "starting CT $OPT_CTID to read its settings" pct start "$OPT_CTID"
  fi
  if [[ -z $API_TOKEN ]] && ((CT_EXISTS)) && ct_running && ct_fetch "$CT_ENV" "$TMP/ct.env"; then
    note "recovering secrets from the container's $CT_ENV (no $H_STATE on the host)"
    local key value
    while IFS='=' read -r key value; do
      case "$key" in
        CTRLABLE_API_TOKEN) API_TOKEN="$value" ;;
        CTRLABLE_FIRSTBOOT_SECRET) FIRSTBOOT_SECRET="$value" ;;
        CTRLABLE_PVE_TOKEN_SECRET) PVE_TOKEN_SECRET="$value" ;;
        CTRLABLE_PLATFORM_TOKEN) if [[ -z $PLATFORM_TOKEN ]]; then PLATFORM_TOKEN="$value"; fi ;;
      esac
    done <"$TMP/ct.env"
  fi
  local name
  for name in API_TOKEN FIRSTBOOT_SECRET; do
    if [[ -n ${!name} ]]; then
      [[ ${!name} =~ $RE_SAFE_VALUE ]] || die "$E_HOST" "$H_STATE: $name holds unexpected characters"
      continue
    fi
    CHANGES=$((CHANGES + 1))
    if ((DRY_RUN)); then
      note "would generate $name"
      printf -v "$name" '%s' "(generated)"
    else
      printf -v "$name" '%s' "$(openssl rand -hex 32)"
      note "generated $name"
    fi
  done
  save_state
}

# host_sync SRC DEST MODE: install SRC as DEST unless DEST already has that content and mode.
host_sync() {
  local src=$1 dest=$2 mode=$3
  if [[ -f $dest ]] && cmp -s "$src" "$dest" && [[ $(stat -c %a "$dest") == "${mode#0}" ]]; then
    return 0
  fi
  mutate "$E_HOST" "installing $dest" install -D -m "$mode" "$src" "$dest"
}

install_build_wrapper() {
  step "Build wrapper $BUILD_WRAPPER and its first-boot files"
  local before=$CHANGES name
  host_sync "$SRC_DIR/host/ctrlable-build" "$H_WRAPPER" 0755
  host_sync "$SRC_DIR/firstboot/ctrlable-firstboot.sh" "$H_SHARE/firstboot/ctrlable-firstboot.sh" 0755
  host_sync "$SRC_DIR/firstboot/ctrlable-firstboot.service" "$H_SHARE/firstboot/ctrlable-firstboot.service" 0644
  if [[ -d $SRC_DIR/host/overlays ]]; then
    while IFS= read -r name; do
      host_sync "$SRC_DIR/host/overlays/$name" "$H_SHARE/overlays/$name" 0644
    done < <(cd "$SRC_DIR/host/overlays" && find . -type f -name '*.patch' | sed 's|^\./||' | sort)
  fi
  if ((CHANGES == before)); then note "up to date"; fi
  local tool missing=""
  for tool in curl jq git python3 xz flock setsid; do
    command -v "$tool" >/dev/null 2>&1 || missing+=" $tool"
  done
  if [[ -n $missing ]]; then
    warn "template builds need:$missing (install them with apt-get)"
  fi
}

# The wrapper's conf (ctrlable-build --help): where the companion is and how to authenticate.
configure_build_wrapper() {
  step "Build wrapper configuration $H_BUILD_CONF"
  local before=$CHANGES
  printf '%s\n' "$API_TOKEN" >"$TMP/companion-token"
  host_sync "$TMP/companion-token" "$H_TOKEN_FILE" 0600
  cat >"$TMP/build.conf" <<EOF
# Written by install.sh for $BUILD_WRAPPER (see ctrlable-build --help). Re-run install.sh to change it.
COMPANION_URL=http://$CT_IP:$OPT_PORT
COMPANION_TOKEN_FILE=$H_TOKEN_FILE
CONTAINER_STORAGE=$OPT_STORAGE
TEMPLATE_STORAGE=$OPT_TEMPLATE_STORAGE
BRIDGE=$OPT_BRIDGE
SERVE_ADDRESS=$OPT_PVE_HOST
EOF
  host_sync "$TMP/build.conf" "$H_BUILD_CONF" 0600
  if ((CHANGES == before)); then note "up to date"; fi
}

ensure_ssh_key() {
  step "Orchestrator SSH key"
  if [[ -f $H_KEY && -f $H_KEY.pub ]]; then
    note "kept $H_KEY"
    return 0
  fi
  if ((!DRY_RUN)); then
    install -d -m 0700 "$H_ETC"
    rm -f -- "$H_KEY" "$H_KEY.pub"
  fi
  mutate "$E_HOST" "generating $H_KEY (ed25519)" ssh-keygen -q -t ed25519 -N "" -C "$KEY_COMMENT" -f "$H_KEY"
}

ensure_authorized_key() {
  step "Restricted SSH access for builds (root's authorized_keys)"
  if [[ ! -f $H_KEY.pub ]]; then
    note "would add: $AUTH_OPTS ssh-ed25519 <new key> $KEY_COMMENT"
    CHANGES=$((CHANGES + 1))
    return 0
  fi
  local type blob line
  read -r type blob _ <"$H_KEY.pub"
  line="$AUTH_OPTS $type $blob $KEY_COMMENT"
  if [[ -f $H_AUTH_KEYS ]] && grep -qxF -- "$line" "$H_AUTH_KEYS"; then
    note "present"
    return 0
  fi
  CHANGES=$((CHANGES + 1))
  if ((DRY_RUN)); then
    note "would add to $H_AUTH_KEYS: $line"
    return 0
  fi
  if [[ ! -e $H_AUTH_KEYS ]]; then
    install -d -m 0700 "$(dirname "$H_AUTH_KEYS")"
    install -m 0600 /dev/null "$H_AUTH_KEYS"
  fi
  # Rewrite in place (the file is often a symlink into /etc/pve/priv): drop any other entry for
  # this key (e.g. one without the restriction), then append the restricted line.
  grep -vF -- "$blob" "$H_AUTH_KEYS" >"$TMP/auth" || true
  printf '%s\n' "$line" >>"$TMP/auth"
  cat "$TMP/auth" >"$H_AUTH_KEYS"
  note "added: $line"
}

remove_authorized_key() {
  [[ -f $H_AUTH_KEYS ]] || return 0
  local pattern=" $KEY_COMMENT"
  if [[ -f $H_KEY.pub ]]; then
    local type blob
    read -r type blob _ <"$H_KEY.pub"
    pattern="$blob"
  fi
  if ! grep -qF -- "$pattern" "$H_AUTH_KEYS"; then return 0; fi
  CHANGES=$((CHANGES + 1))
  if ((DRY_RUN)); then
    note "would remove the orchestrator key from $H_AUTH_KEYS"
    return 0
  fi
  grep -vF -- "$pattern" "$H_AUTH_KEYS" >"$TMP/auth" || true
  cat "$TMP/auth" >"$H_AUTH_KEYS"
  note "removed the orchestrator key from $H_AUTH_KEYS"
}

ensure_role() {
  capture "$E_ACCESS" "pveum role list" pveum role list --output-format json
  local current
  # shellcheck disable=SC2016  # perl code
  current="$(json 'for (@$d) { next unless $_->{roleid} eq $ARGV[0]; my $p = $_->{privs} // ""; print ref $p ? join(",", @$p) : $p, "\n"; exit 0 } print "-\n";' "$ROLE")"
  if [[ $current == "-" ]]; then
    mutate "$E_ACCESS" "creating role $ROLE" pveum role add "$ROLE" --privs "$PRIVS"
  elif [[ $(norm_privs "$current") != "$(norm_privs "$PRIVS")" ]]; then
    note "role $ROLE has privileges '$(norm_privs "$current")'"
    mutate "$E_ACCESS" "updating role $ROLE to exactly: $PRIVS" pveum role modify "$ROLE" --privs "$PRIVS"
  else
    note "role $ROLE: up to date"
  fi
}

ensure_user() {
  capture "$E_ACCESS" "pveum user list" pveum user list --output-format json
  local state
  # shellcheck disable=SC2016  # perl code
  state="$(json 'for (@$d) { next unless $_->{userid} eq $ARGV[0]; print((!defined $_->{enable} || $_->{enable}) ? "enabled\n" : "disabled\n"); exit 0 } print "-\n";' "$PVE_USER")"
  case "$state" in
    -)
      mutate "$E_ACCESS" "creating user $PVE_USER" pveum user add "$PVE_USER" --comment "Ctrlable provisioner (install.sh)"
      USER_PLANNED=$DRY_RUN
      ;;
    disabled) mutate "$E_ACCESS" "enabling user $PVE_USER" pveum user modify "$PVE_USER" --enable 1 ;;
    *) note "user $PVE_USER: present" ;;
  esac
}

add_token() {
  mutate "$E_ACCESS" "creating API token $TOKEN_ID (privilege separated)" \
    pveum user token add "$PVE_USER" "$TOKEN_NAME" --privsep 1 \
    --comment "Ctrlable companion (install.sh)" --output-format json
  if ((DRY_RUN)); then
    PVE_TOKEN_SECRET="(from-pveum)"
    return 0
  fi
  local secret
  # shellcheck disable=SC2016  # perl code
  secret="$(json 'print $d->{value} // "";')"
  [[ $secret =~ ^[A-Za-z0-9-]{8,}$ ]] || die "$E_ACCESS" "pveum user token add returned no usable secret ('value')"
  PVE_TOKEN_SECRET="$secret"
  save_state # the secret is shown only once: keep it before anything else can fail
}

ensure_token() {
  if ((USER_PLANNED)); then # dry run: the user does not exist yet, so neither does its token
    add_token
    return 0
  fi
  capture "$E_ACCESS" "pveum user token list" pveum user token list "$PVE_USER" --output-format json
  local state
  # shellcheck disable=SC2016  # perl code
  state="$(json 'for (@$d) { next unless $_->{tokenid} eq $ARGV[0]; print((($_->{privsep} // 1) ? "privsep" : "shared") . "\n"); exit 0 } print "-\n";' "$TOKEN_NAME")"
  if [[ $state == "-" ]]; then
    add_token
    return 0
  fi
  if [[ -z $PVE_TOKEN_SECRET ]]; then
    note "token $TOKEN_ID exists but its secret is not on record: replacing it"
    mutate "$E_ACCESS" "removing token $TOKEN_ID" pveum user token remove "$PVE_USER" "$TOKEN_NAME"
    add_token
    return 0
  fi
  if [[ $state == shared ]]; then
    mutate "$E_ACCESS" "turning on privilege separation for $TOKEN_ID" \
      pveum user token modify "$PVE_USER" "$TOKEN_NAME" --privsep 1
  else
    note "token $TOKEN_ID: present, privilege separated"
  fi
}

ensure_acls() {
  capture "$E_ACCESS" "pveum acl list" pveum acl list --output-format json
  local have
  # shellcheck disable=SC2016  # perl code
  have="$(json 'for (@$d) { next unless ($_->{path} // "") eq "/" && ($_->{roleid} // "") eq $ARGV[0]; print "$_->{type} $_->{ugid}\n"; }' "$ROLE")"
  if grep -qxF "user $PVE_USER" <<<"$have"; then
    note "ACL / $PVE_USER $ROLE: present"
  else
    mutate "$E_ACCESS" "ACL / for user $PVE_USER" pveum acl modify / --users "$PVE_USER" --roles "$ROLE"
  fi
  if grep -qxF "token $TOKEN_ID" <<<"$have"; then
    note "ACL / $TOKEN_ID $ROLE: present"
  else
    mutate "$E_ACCESS" "ACL / for token $TOKEN_ID" pveum acl modify / --tokens "$TOKEN_ID" --roles "$ROLE"
  fi
}

verify_token_permissions() {
  ((DRY_RUN)) && return 0
  capture "$E_ACCESS" "pveum user token permissions" \
    pveum user token permissions "$PVE_USER" "$TOKEN_NAME" --path / --output-format json
  local missing
  local -a privs
  read -r -a privs <<<"$PRIVS"
  # shellcheck disable=SC2016  # perl code
  missing="$(json 'my $p = $d->{"/"} // {}; print join(" ", grep { !$p->{$_} } @ARGV);' "${privs[@]}")"
  [[ -z $missing ]] || die "$E_ACCESS" "token $TOKEN_ID lacks on /: $missing (check the ACLs with 'pveum acl list')"
  note "token $TOKEN_ID holds exactly the role's privileges on /"
}

setup_pve_access() {
  step "PVE access: role $ROLE, user $PVE_USER, token $TOKEN_ID"
  ensure_role
  ensure_user
  ensure_token
  ensure_acls
  verify_token_permissions
}

ensure_template() {
  step "Debian 12 template"
  if [[ -n $OPT_TEMPLATE ]]; then
    capture "$E_TEMPLATE" "pveam list" pveam list "${OPT_TEMPLATE%%:*}"
    awk -v v="$OPT_TEMPLATE" 'NR > 1 && $1 == v { f = 1 } END { exit !f }' <<<"$OUT" ||
      die "$E_TEMPLATE" "--template: $OPT_TEMPLATE is not on storage ${OPT_TEMPLATE%%:*}"
    TEMPLATE_VOLID="$OPT_TEMPLATE"
    note "using $TEMPLATE_VOLID"
    return 0
  fi
  local re="vztmpl/debian-12-standard_[^ ]*_${ARCH_DEB}\\.tar\\.(zst|gz|xz)\$"
  capture "$E_TEMPLATE" "pveam list" pveam list "$OPT_TEMPLATE_STORAGE"
  TEMPLATE_VOLID="$(awk -v re="$re" 'NR > 1 && $1 ~ re { print $1 }' <<<"$OUT" | sort -V | tail -n 1)"
  if [[ -n $TEMPLATE_VOLID ]]; then
    note "using $TEMPLATE_VOLID"
    return 0
  fi
  storage_rows vztmpl
  local avail
  avail="$(awk -v n="$OPT_TEMPLATE_STORAGE" '$1 == n { print $6 }' <<<"$OUT")"
  if ((${avail:-0} < 512 * 1024)); then
    die "$E_STORAGE" "storage '$OPT_TEMPLATE_STORAGE' has less than 512 MiB free for the template"
  fi
  mutate "$E_TEMPLATE" "updating the template catalog" pveam update
  capture "$E_TEMPLATE" "pveam available" pveam available --section system
  local name
  name="$(awk -v re="^debian-12-standard_[^ ]*_${ARCH_DEB}\\.tar\\.(zst|gz|xz)\$" '$2 ~ re { print $2 }' <<<"$OUT" | sort -V | tail -n 1)"
  if [[ -z $name ]]; then
    if ((DRY_RUN)); then
      note "would download the newest debian-12-standard ($ARCH_DEB) template"
      TEMPLATE_VOLID="$OPT_TEMPLATE_STORAGE:vztmpl/debian-12-standard_(newest)_${ARCH_DEB}.tar.zst"
      return 0
    fi
    die "$E_TEMPLATE" "no debian-12-standard template for $ARCH_DEB in the catalog (pveam available); download one and pass --template"
  fi
  mutate "$E_TEMPLATE" "downloading $name to $OPT_TEMPLATE_STORAGE" pveam download "$OPT_TEMPLATE_STORAGE" "$name"
  TEMPLATE_VOLID="$OPT_TEMPLATE_STORAGE:vztmpl/$name"
}

desired_net0() { # CURRENT_NET0 -> net0 string with our fields set, others kept
  local current=$1 part key
  declare -A kv=()
  local -a order=()
  local IFS=','
  for part in $current; do
    key="${part%%=*}"
    kv[$key]="${part#*=}"
    order+=("$key")
  done
  unset IFS
  kv[name]="${kv[name]:-eth0}"
  kv[bridge]="$OPT_BRIDGE"
  kv[ip]="$OPT_IP"
  kv[firewall]="${kv[firewall]:-1}"
  if [[ -n $OPT_GW ]]; then kv[gw]="$OPT_GW"; else unset 'kv[gw]'; fi
  if [[ -n $OPT_VLAN ]]; then kv[tag]="$OPT_VLAN"; else unset 'kv[tag]'; fi
  local out="name=${kv[name]}" seen=" name " k
  for k in "${order[@]}" bridge firewall gw ip tag; do
    [[ $seen == *" $k "* || -z ${kv[$k]+x} ]] && continue
    out+=",$k=${kv[$k]}"
    seen+="$k "
  done
  printf '%s\n' "$out"
}

net0_fields() { # NET0 -> "bridge ip gw tag" normalized
  local part bridge="" ip="" gw="" tag="" IFS=','
  for part in $1; do
    case "$part" in
      bridge=*) bridge="${part#*=}" ;;
      ip=*) ip="${part#*=}" ;;
      gw=*) gw="${part#*=}" ;;
      tag=*) tag="${part#*=}" ;;
    esac
  done
  printf '%s|%s|%s|%s\n' "$bridge" "$ip" "$gw" "$tag"
}

create_container() {
  if [[ -z $OPT_CTID ]]; then
    capture "$E_CT" "pvesh get /cluster/nextid" pvesh get /cluster/nextid --output-format json
    OPT_CTID="${OUT//[^0-9]/}"
    [[ -n $OPT_CTID ]] || die "$E_CT" "pvesh returned no free id"
  else
    local rc=0
    pvesh get /cluster/nextid --vmid "$OPT_CTID" --output-format json >/dev/null 2>"$TMP/stderr" || rc=$?
    ((rc == 0)) || die "$E_CT" "id $OPT_CTID is taken: $(tail -n 1 "$TMP/stderr"); choose another --ctid"
  fi
  ensure_template
  step "Orchestrator container $OPT_CTID"
  local net0 disk
  net0="$(desired_net0 "")"
  disk="$OPT_STORAGE:$OPT_DISK"
  mutate "$E_CT" "creating CT $OPT_CTID ($OPT_HOSTNAME, $TEMPLATE_VOLID)" \
    pct create "$OPT_CTID" "$TEMPLATE_VOLID" --hostname "$OPT_HOSTNAME" \
    --description "Ctrlable orchestrator: runs the Ctrlable companion. Managed by install.sh." \
    --tags "$CT_TAG" --unprivileged 1 --features nesting=1 --ostype debian \
    --cores "$OPT_CORES" --memory "$OPT_MEMORY" --swap "$OPT_SWAP" --rootfs "$disk" \
    --net0 "$net0" --onboot 1 --timezone host --start 0
  save_state
}

reconcile_container() {
  step "Orchestrator container $OPT_CTID"
  local -a args=()
  [[ ${CTCONF[hostname]:-} == "$OPT_HOSTNAME" ]] || args+=(--hostname "$OPT_HOSTNAME")
  [[ ${CTCONF[cores]:-} == "$OPT_CORES" ]] || args+=(--cores "$OPT_CORES")
  [[ ${CTCONF[memory]:-} == "$OPT_MEMORY" ]] || args+=(--memory "$OPT_MEMORY")
  [[ ${CTCONF[swap]:-} == "$OPT_SWAP" ]] || args+=(--swap "$OPT_SWAP")
  [[ ${CTCONF[onboot]:-0} == 1 ]] || args+=(--onboot 1)
  local want
  want="$(desired_net0 "${CTCONF[net0]:-}")"
  if [[ $(net0_fields "${CTCONF[net0]:-}") != "$(net0_fields "$want")" ]]; then
    args+=(--net0 "$want")
  fi
  if ((${#args[@]})); then
    mutate "$E_CT" "updating CT $OPT_CTID: ${args[*]}" pct set "$OPT_CTID" "${args[@]}"
  else
    note "configuration: up to date"
  fi
  local size="${CTCONF[rootfs]:-}" gib=0
  size="${size##*size=}"
  size="${size%%,*}"
  case "$size" in
    *T) gib=$((${size%T} * 1024)) ;;
    *G) gib=${size%G} ;;
    *M) gib=$((${size%M} / 1024)) ;;
  esac
  if [[ $gib =~ ^[0-9]+$ ]] && ((gib > 0)); then
    if ((OPT_DISK > gib)); then
      mutate "$E_CT" "growing the disk to ${OPT_DISK}G" pct resize "$OPT_CTID" rootfs "${OPT_DISK}G"
    elif ((OPT_DISK < gib)); then
      warn "--disk $OPT_DISK is smaller than the container's ${gib}G disk; disks are never shrunk"
    fi
  fi
}

start_container() {
  if ((CT_EXISTS)) && ct_running; then
    note "running"
  else
    mutate "$E_CT" "starting CT $OPT_CTID" pct start "$OPT_CTID"
  fi
  ((DRY_RUN && !CT_EXISTS)) && return 0
  local try state=""
  for ((try = 1; try <= POLL_TRIES; try++)); do
    state="$(timeout 120 pct exec "$OPT_CTID" -- systemctl is-system-running --wait 2>/dev/null || true)"
    if [[ $state == running || $state == degraded ]]; then break; fi
    sleep_poll
  done
  [[ $state == running || $state == degraded ]] || die "$E_CT" "CT $OPT_CTID did not finish booting (systemd state '${state:-unknown}')"
  if [[ $OPT_IP != dhcp ]]; then
    CT_IP="${OPT_IP%/*}"
    return 0
  fi
  for ((try = 1; try <= POLL_TRIES; try++)); do
    CT_IP="$(pct exec "$OPT_CTID" -- hostname -I 2>/dev/null | tr ' ' '\n' | grep -E "$RE_IPV4" | head -n 1 || true)"
    [[ -n $CT_IP ]] && break
    sleep_poll
  done
  [[ -n $CT_IP ]] || die "$E_CT" "CT $OPT_CTID got no IPv4 address by DHCP on $OPT_BRIDGE; check the DHCP server or pass --ip/--gw"
  note "address $CT_IP (DHCP: reserve it so the companion URL stays valid)"
}

setup_container() {
  if ((CT_EXISTS)); then reconcile_container; else create_container; fi
  start_container
  if ((DRY_RUN && !CT_EXISTS)); then
    if [[ $OPT_IP == dhcp ]]; then CT_IP="DHCP-ADDRESS"; else CT_IP="${OPT_IP%/*}"; fi
  fi
}

make_source_tarball() {
  local -a items=()
  local item
  for item in pyproject.toml README.md LICENSE .env.example SPEC.md install.sh companion releases \
    host firstboot deploy docs; do
    if [[ -e $SRC_DIR/$item ]]; then items+=("$item"); fi
  done
  tar -C "$SRC_DIR" --sort=name --mtime='@0' --owner=0 --group=0 --numeric-owner --format=gnu \
    --exclude='__pycache__' --exclude='*.pyc' --exclude='*.egg-info' -cf "$TMP/source.tar" "${items[@]}"
  gzip -n -c "$TMP/source.tar" >"$TMP/source.tar.gz"
  SRC_HASH="$(sha256sum "$TMP/source.tar" | cut -d' ' -f1)"
  printf '%s\n' "$SRC_HASH" >"$TMP/source.sha256"
}

install_companion() {
  step "Companion in CT $OPT_CTID"
  make_source_tarball
  if ((CT_EXISTS)) && ct_fetch "$CT_STAMP" "$TMP/stamp" && cmp -s "$TMP/stamp" "$TMP/source.sha256"; then
    note "installed version is current (source ${SRC_HASH:0:12})"
    return 0
  fi
  note "installing source ${SRC_HASH:0:12} from $SRC_DIR"
  COMPANION_UPDATED=1
  local try ok=0
  for ((try = 1; try <= 3; try++)); do
    if ((DRY_RUN)); then
      mutate "$E_COMPANION" "apt-get update" pct exec "$OPT_CTID" -- apt-get update -q
      ok=1
      break
    fi
    if pct exec "$OPT_CTID" -- apt-get update -q >/dev/null 2>"$TMP/stderr"; then
      ok=1
      break
    fi
    sleep_poll
  done
  ((ok)) || die "$E_COMPANION" "apt-get update failed in CT $OPT_CTID (no network?): $(tail -n 2 "$TMP/stderr" | tr '\n' ' ')"
  ct_exec "$E_COMPANION" "installing python3-venv" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates
  if ((DRY_RUN)) || ! pct exec "$OPT_CTID" -- id -u "$CT_USER" >/dev/null 2>&1; then
    ct_exec "$E_COMPANION" "creating system user $CT_USER" useradd --system --user-group \
      --home-dir "$CT_DATA" --no-create-home --shell /usr/sbin/nologin "$CT_USER"
  fi
  ct_exec "$E_COMPANION" "creating $CT_APP_DIR and $CT_ETC" mkdir -p "$CT_APP_DIR" "$CT_ETC"
  ct_exec "$E_COMPANION" "securing $CT_ETC" chown "root:$CT_USER" "$CT_ETC"
  ct_exec "$E_COMPANION" "securing $CT_ETC" chmod 0750 "$CT_ETC"
  mutate "$E_COMPANION" "copying the source into the container" \
    pct push "$OPT_CTID" "$TMP/source.tar.gz" "$CT_APP_DIR/source.tar.gz" --perms 0644
  ct_exec "$E_COMPANION" "unpacking" rm -rf "$CT_SRC.new"
  ct_exec "$E_COMPANION" "unpacking" mkdir -p "$CT_SRC.new"
  ct_exec "$E_COMPANION" "unpacking" tar --no-same-owner -xzf "$CT_APP_DIR/source.tar.gz" -C "$CT_SRC.new"
  ct_exec "$E_COMPANION" "replacing $CT_SRC" rm -rf "$CT_SRC"
  ct_exec "$E_COMPANION" "replacing $CT_SRC" mv "$CT_SRC.new" "$CT_SRC"
  ct_exec "$E_COMPANION" "cleaning up" rm -f "$CT_APP_DIR/source.tar.gz"
  if ((DRY_RUN)) || ! pct exec "$OPT_CTID" -- test -x "$CT_VENV/bin/python" >/dev/null 2>&1; then
    ct_exec "$E_COMPANION" "creating the venv $CT_VENV" python3 -m venv "$CT_VENV"
  fi
  ct_exec "$E_COMPANION" "pip install (dependencies)" "$CT_VENV/bin/pip" install --no-cache-dir -q --upgrade "$CT_SRC"
  ct_exec "$E_COMPANION" "pip install (this source)" "$CT_VENV/bin/pip" install --no-cache-dir -q \
    --force-reinstall --no-deps "$CT_SRC"
  if ((!DRY_RUN)) && ! pct exec "$OPT_CTID" -- test -x "$CT_VENV/bin/ctrlable-companion" >/dev/null 2>&1; then
    die "$E_COMPANION" "pip did not install $CT_VENV/bin/ctrlable-companion"
  fi
  mutate "$E_COMPANION" "recording the installed source" \
    pct push "$OPT_CTID" "$TMP/source.sha256" "$CT_STAMP" --perms 0644
}

render_env() {
  local public_url="http://$CT_IP:$OPT_PORT"
  cat <<EOF
# Ctrlable companion settings: written by install.sh, read by ctrlable-companion.service
# (EnvironmentFile=). Root only (0600). Re-run install.sh to change them; the keys are
# documented in .env.example (companion/settings.py).
CTRLABLE_API_TOKEN=$API_TOKEN
CTRLABLE_LISTEN_HOST=0.0.0.0
CTRLABLE_LISTEN_PORT=$OPT_PORT
CTRLABLE_PUBLIC_URL=$public_url
CTRLABLE_DATA_DIR=$CT_DATA
CTRLABLE_RELEASES_DIR=$CT_SRC/releases
CTRLABLE_SITE_ID=$OPT_SITE_ID
CTRLABLE_MDNS=true
CTRLABLE_PVE_URL=https://$OPT_PVE_HOST:8006
CTRLABLE_PVE_TOKEN_ID=$TOKEN_ID
CTRLABLE_PVE_TOKEN_SECRET=$PVE_TOKEN_SECRET
CTRLABLE_PVE_FINGERPRINT=$PVE_FINGERPRINT
CTRLABLE_FIRSTBOOT_SECRET=$FIRSTBOOT_SECRET
CTRLABLE_BUILD_SSH_HOST=$OPT_PVE_HOST
CTRLABLE_BUILD_SSH_PORT=22
CTRLABLE_BUILD_SSH_USER=root
CTRLABLE_BUILD_SSH_KEY_FILE=$CT_KEY
CTRLABLE_BUILD_SSH_KNOWN_HOSTS=$CT_KNOWN_HOSTS
EOF
  if [[ -n $OPT_PLATFORM_URL ]]; then printf 'CTRLABLE_PLATFORM_URL=%s\n' "$OPT_PLATFORM_URL"; fi
  if [[ -n $PLATFORM_TOKEN ]]; then printf 'CTRLABLE_PLATFORM_TOKEN=%s\n' "$PLATFORM_TOKEN"; fi
}

restore_data() {
  local backup="$H_BACKUP_DIR/ctrlable-data.tar"
  [[ -f $backup ]] || return 0
  if ((CT_EXISTS)) && pct exec "$OPT_CTID" -- test -e "$CT_DATA/ctrlable.db" >/dev/null 2>&1; then
    return 0
  fi
  note "restoring the companion data saved by --uninstall ($backup)"
  if ((CT_EXISTS)) && pct exec "$OPT_CTID" -- systemctl is-active --quiet "$CT_UNIT_NAME" >/dev/null 2>&1; then
    ct_exec "$E_COMPANION" "stopping the companion" systemctl stop "$CT_UNIT_NAME"
  fi
  mutate "$E_COMPANION" "copying the saved data" pct push "$OPT_CTID" "$backup" /root/ctrlable-data.tar --perms 0600
  ct_exec "$E_COMPANION" "restoring $CT_DATA" mkdir -p "$CT_DATA"
  ct_exec "$E_COMPANION" "restoring $CT_DATA" tar --no-same-owner -xf /root/ctrlable-data.tar -C "$CT_DATA"
  ct_exec "$E_COMPANION" "restoring $CT_DATA" chown -R "$CT_USER:$CT_USER" "$CT_DATA"
  ct_exec "$E_COMPANION" "restoring $CT_DATA" chmod 0750 "$CT_DATA"
  ct_exec "$E_COMPANION" "cleaning up" rm -f /root/ctrlable-data.tar
  if ((!DRY_RUN)); then mv -f "$backup" "$backup.restored"; fi
}

configure_companion() {
  step "Companion configuration and service"
  local restart=$COMPANION_UPDATED reload=0
  render_env >"$TMP/companion.env"
  if grep -q '[[:space:]"'\''\\$`]' <(grep -v '^#' "$TMP/companion.env"); then
    die "$E_INTERNAL" "refusing to write a .env value with whitespace, quotes or shell characters"
  fi
  ct_sync "$TMP/companion.env" "$CT_ENV" 0600 root
  ((SYNC_CHANGED)) && restart=1
  if [[ -f $H_KEY ]]; then
    ct_sync "$H_KEY" "$CT_KEY" 0600 "$CT_USER"
    ((SYNC_CHANGED)) && restart=1
    ct_sync "$H_KEY.pub" "$CT_KEY.pub" 0644 root
  else
    note "would copy the orchestrator SSH key to $CT_KEY"
  fi
  printf '%s %s\n' "$OPT_PVE_HOST" "$HOST_KEY_LINE" >"$TMP/known_hosts"
  ct_sync "$TMP/known_hosts" "$CT_KNOWN_HOSTS" 0644 root
  ((SYNC_CHANGED)) && restart=1
  ct_sync "$SRC_DIR/deploy/ctrlable-companion.service" "$CT_UNIT" 0644 root
  if ((SYNC_CHANGED)); then
    restart=1
    reload=1
  fi
  restore_data
  if ((reload)); then ct_exec "$E_COMPANION" "systemctl daemon-reload" systemctl daemon-reload; fi
  local enabled=0 active=0
  if ((CT_EXISTS)); then
    pct exec "$OPT_CTID" -- systemctl is-enabled --quiet "$CT_UNIT_NAME" >/dev/null 2>&1 && enabled=1
    pct exec "$OPT_CTID" -- systemctl is-active --quiet "$CT_UNIT_NAME" >/dev/null 2>&1 && active=1
  fi
  if ((!enabled)); then
    ct_exec "$E_COMPANION" "enabling and starting $CT_UNIT_NAME" systemctl enable --now "$CT_UNIT_NAME"
    ((active && restart)) && ct_exec "$E_COMPANION" "restarting $CT_UNIT_NAME" systemctl restart "$CT_UNIT_NAME"
  elif ((restart || !active)); then
    ct_exec "$E_COMPANION" "restarting $CT_UNIT_NAME" systemctl restart "$CT_UNIT_NAME"
  else
    note "$CT_UNIT_NAME: enabled and active, configuration unchanged"
  fi
  ((DRY_RUN)) && return 0
  local try
  for ((try = 1; try <= POLL_TRIES; try++)); do
    if pct exec "$OPT_CTID" -- "$CT_VENV/bin/python" -c \
      'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' \
      "http://127.0.0.1:$OPT_PORT/api/health" >/dev/null 2>&1; then
      note "health check passed (GET /api/health)"
      return 0
    fi
    sleep_poll
  done
  die "$E_COMPANION" "the companion does not answer on port $OPT_PORT; see 'pct exec $OPT_CTID -- journalctl -u $CT_UNIT_NAME'"
}

print_summary() {
  if ((DRY_RUN)); then
    printf 'Dry run: %d change(s) would be made; nothing was changed.\n' "$CHANGES"
    return 0
  fi
  cat <<EOF

Ctrlable companion is running in CT $OPT_CTID ($OPT_HOSTNAME).
  Companion URL:  http://$CT_IP:$OPT_PORT
  Pairing token:  $API_TOKEN

Home Assistant discovers the companion by zeroconf (_ctrlable._tcp): open Settings > Devices &
services, confirm the discovered "Ctrlable" entry and paste the pairing token. Without discovery,
add the Ctrlable integration by hand with the URL and token above.
The token is also in $H_STATE (root only). Re-run install.sh to upgrade; it keeps the
database and the secrets.
EOF
}

do_install() {
  step "Preflight"
  check_pve_version
  check_arch
  check_source
  discover_ct
  check_storage
  check_host_files
  detect_pve_host
  note "this host is reached at $OPT_PVE_HOST (API https://$OPT_PVE_HOST:8006, fingerprint ${PVE_FINGERPRINT:0:23}...)"
  ensure_secrets
  ensure_ssh_key
  install_build_wrapper
  ensure_authorized_key
  setup_pve_access
  setup_container
  install_companion
  configure_companion
  configure_build_wrapper
  save_state
  print_summary
}

# ---------------------------------------------------------------------------------------------
# Uninstall

backup_data() {
  step "Saving the companion data ($CT_DATA) to $H_BACKUP_DIR"
  if ! ct_running; then
    mutate "$E_CT" "starting CT $OPT_CTID to save its data" pct start "$OPT_CTID"
  fi
  if ((!DRY_RUN)) && ! pct exec "$OPT_CTID" -- test -d "$CT_DATA" >/dev/null 2>&1; then
    note "no $CT_DATA in the container: nothing to save"
    return 0
  fi
  if ((DRY_RUN)) || pct exec "$OPT_CTID" -- systemctl is-active --quiet "$CT_UNIT_NAME" >/dev/null 2>&1; then
    ct_exec "$E_COMPANION" "stopping the companion" systemctl stop "$CT_UNIT_NAME"
  fi
  ct_exec "$E_COMPANION" "archiving $CT_DATA" tar -C "$CT_DATA" -cf /root/ctrlable-data.tar .
  if ((DRY_RUN)); then
    note "would copy it to $H_BACKUP_DIR/ctrlable-data.tar"
    return 0
  fi
  install -d -m 0700 "$H_BACKUP_DIR"
  capture "$E_CT" "pct pull" pct pull "$OPT_CTID" /root/ctrlable-data.tar "$H_BACKUP_DIR/ctrlable-data.tar.new"
  chmod 0600 "$H_BACKUP_DIR/ctrlable-data.tar.new"
  mv -f "$H_BACKUP_DIR/ctrlable-data.tar.new" "$H_BACKUP_DIR/ctrlable-data.tar"
  note "saved $H_BACKUP_DIR/ctrlable-data.tar (restored by the next install)"
}

remove_pve_access() {
  step "Removing PVE access objects"
  capture "$E_ACCESS" "pveum acl list" pveum acl list --output-format json
  local have
  # shellcheck disable=SC2016  # perl code
  have="$(json 'for (@$d) { print "$_->{type} $_->{ugid} $_->{path} $_->{roleid}\n"; }')"
  local path
  while read -r path; do
    mutate "$E_ACCESS" "ACL $path for token $TOKEN_ID" pveum acl delete "$path" --tokens "$TOKEN_ID" --roles "$ROLE"
  done < <(awk -v u="$TOKEN_ID" -v r="$ROLE" '$1 == "token" && $2 == u && $4 == r { print $3 }' <<<"$have")
  while read -r path; do
    mutate "$E_ACCESS" "ACL $path for user $PVE_USER" pveum acl delete "$path" --users "$PVE_USER" --roles "$ROLE"
  done < <(awk -v u="$PVE_USER" -v r="$ROLE" '$1 == "user" && $2 == u && $4 == r { print $3 }' <<<"$have")
  capture "$E_ACCESS" "pveum user list" pveum user list --output-format json
  # shellcheck disable=SC2016  # perl code
  if [[ $(json 'print scalar grep { $_->{userid} eq $ARGV[0] } @$d;' "$PVE_USER") != 0 ]]; then
    capture "$E_ACCESS" "pveum user token list" pveum user token list "$PVE_USER" --output-format json
    # shellcheck disable=SC2016  # perl code
    if [[ $(json 'print scalar grep { $_->{tokenid} eq $ARGV[0] } @$d;' "$TOKEN_NAME") != 0 ]]; then
      mutate "$E_ACCESS" "removing token $TOKEN_ID" pveum user token remove "$PVE_USER" "$TOKEN_NAME"
    fi
    mutate "$E_ACCESS" "removing user $PVE_USER" pveum user delete "$PVE_USER"
  fi
  capture "$E_ACCESS" "pveum role list" pveum role list --output-format json
  # shellcheck disable=SC2016  # perl code
  if [[ $(json 'print scalar grep { $_->{roleid} eq $ARGV[0] } @$d;' "$ROLE") != 0 ]]; then
    mutate "$E_ACCESS" "removing role $ROLE" pveum role delete "$ROLE"
  fi
  PVE_TOKEN_SECRET=""
}

do_uninstall() {
  step "Preflight"
  check_pve_version
  discover_ct
  resolve_secrets_for_uninstall
  if ((CT_EXISTS)); then
    if ((!PURGE_DATA)); then backup_data; fi
    step "Removing CT $OPT_CTID"
    if ct_running; then mutate "$E_CT" "stopping CT $OPT_CTID" pct stop "$OPT_CTID"; fi
    mutate "$E_CT" "destroying CT $OPT_CTID" pct destroy "$OPT_CTID" --purge 1
  else
    note "no orchestrator container found"
  fi
  remove_pve_access
  step "Removing host files"
  remove_authorized_key
  if [[ -e $H_WRAPPER ]]; then mutate "$E_HOST" "removing $H_WRAPPER" rm -f "$H_WRAPPER"; fi
  if [[ -e $H_SHARE ]]; then mutate "$E_HOST" "removing $H_SHARE" rm -rf "$H_SHARE"; fi
  if [[ -e $H_BUILD_CONF || -e $H_TOKEN_FILE ]]; then
    mutate "$E_HOST" "removing the build wrapper's conf" rm -f "$H_BUILD_CONF" "$H_TOKEN_FILE"
  fi
  if ((PURGE_DATA)); then
    if [[ -e $H_ETC ]]; then mutate "$E_HOST" "removing $H_ETC (secrets, SSH key)" rm -rf "$H_ETC"; fi
    if [[ -e $H_BACKUP_DIR ]]; then mutate "$E_HOST" "removing $H_BACKUP_DIR" rm -rf "$H_BACKUP_DIR"; fi
  elif [[ -f $H_STATE ]]; then
    OPT_CTID=""
    save_state
    note "kept $H_ETC (pairing token, firstboot secret, SSH key) for a later install"
  fi
  if ((DRY_RUN)); then
    printf 'Dry run: %d change(s) would be made; nothing was changed.\n' "$CHANGES"
  else
    printf 'Ctrlable Provisioner removed from this host%s.\n' \
      "$( ((PURGE_DATA)) && printf ' (data purged)' || printf '; data kept in %s' "$H_BACKUP_DIR")"
  fi
}

# The uninstall keeps the state file's options and secrets (minus the removed CT and token).
resolve_secrets_for_uninstall() {
  API_TOKEN="${SAVED_API_TOKEN:-}"
  FIRSTBOOT_SECRET="${SAVED_FIRSTBOOT_SECRET:-}"
  PVE_TOKEN_SECRET="${SAVED_PVE_TOKEN_SECRET:-}"
}

# ---------------------------------------------------------------------------------------------

main() {
  trap 'on_err "$LINENO" "$BASH_COMMAND"' ERR
  trap cleanup EXIT
  parse_args "$@"
  init_paths
  check_root
  check_tools
  TMP="$(mktemp -d "${TMPDIR:-/tmp}/ctrlable-install.XXXXXX")"
  load_state
  resolve_options
  if ((DRY_RUN)); then step "Dry run: nothing will be changed"; fi
  case "$ACTION" in
    install) do_install ;;
    uninstall) do_uninstall ;;
  esac
}

main "$@"
