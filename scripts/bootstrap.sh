#!/usr/bin/env bash
# Create (or refresh) the project's two virtual environments, idempotently.
#   .venv     Python 3.13: Home Assistant 2025.4.4 + its test harness + the companion (editable)
#   .venv311  Python 3.11: the companion alone, as it runs on a Debian 12 LXC
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf '[bootstrap] %s\n' "$*" >&2; }

find_python() {
  local minor="$1" candidate="python$1" root
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -V >/dev/null 2>&1; then
    command -v "$candidate"; return 0
  fi
  if command -v pyenv >/dev/null 2>&1; then
    root="$(pyenv root)"
    for candidate in "$root"/versions/"${minor}".*/bin/"python${minor}"; do
      if [[ -x "$candidate" ]]; then printf '%s\n' "$candidate"; return 0; fi
    done
  fi
  return 1
}

# pip's noise about this machine's local index folders and setuptools' deprecation banners.
filter_pip() {
  grep -vE "WARNING: Location|^\s*$|!!|\*{10}|BuildBackendWarning|corresp\(|return '|with strategy|Please |By 20|See https|setuptools" || true
}

stamp_of() {
  cat "$ROOT/pyproject.toml" "$@" | sha256sum | cut -d' ' -f1
}

make_venv() {
  local dir="$1" minor="$2"; shift 2
  local py stamp
  stamp="$(stamp_of "$@")"
  if [[ -f "$dir/.stamp" && "$(cat "$dir/.stamp")" == "$stamp" ]]; then
    log "$dir is up to date"; return 0
  fi
  py="$(find_python "$minor")" || { log "Python $minor not found (PATH or pyenv)"; exit 1; }
  log "creating $dir with $py"
  "$py" -m venv "$dir"
  "$dir/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1
  return 10
}

main() {
  cd "$ROOT"
  local rc=0
  make_venv .venv 3.13 requirements/test-ha.txt requirements/ha-constraints.txt || rc=$?
  if [[ $rc -eq 10 ]]; then
    .venv/bin/pip install --quiet -c requirements/ha-constraints.txt -r requirements/test-ha.txt 2>&1 | filter_pip
    .venv/bin/pip install --quiet -c requirements/ha-constraints.txt -e '.[test]' 2>&1 | filter_pip
    stamp_of requirements/test-ha.txt requirements/ha-constraints.txt > .venv/.stamp
  elif [[ $rc -ne 0 ]]; then exit "$rc"; fi
  rc=0
  make_venv .venv311 3.11 || rc=$?
  if [[ $rc -eq 10 ]]; then
    .venv311/bin/pip install --quiet -e '.[test]' 2>&1 | filter_pip
    stamp_of > .venv311/.stamp
  elif [[ $rc -ne 0 ]]; then exit "$rc"; fi
}

main "$@"
