#!/usr/bin/env bash
# Run the test groups, each in the interpreter it targets, and print one closing summary line.
#   companion  Python 3.11 (.venv311): the companion as it runs on a Debian 12 LXC
#   ha         Python 3.13 (.venv): the integration under pytest-homeassistant-custom-component
#   e2e        Python 3.13 (.venv): real hass + companion + simulator processes
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPORTS="$ROOT/.pytest_cache/reports"

run_group() {
  local group="$1" rc=0
  local -a cmd
  case "$group" in
    companion) cmd=(.venv311/bin/pytest tests/companion) ;;
    ha) cmd=(.venv/bin/pytest tests/ha) ;;
    e2e) cmd=(.venv/bin/pytest -p no:homeassistant tests/e2e) ;;
    *) echo "unknown test group: $group" >&2; return 2 ;;
  esac
  echo "== tests: $group (${cmd[0]%/bin/pytest})"
  "${cmd[@]}" -q -p no:cacheprovider --junitxml="$REPORTS/$group.xml" || rc=$?
  if [[ $rc -eq 5 ]]; then
    echo "tests: $group has no tests"
    rm -f "$REPORTS/$group.xml"
    return 0
  fi
  return "$rc"
}

summary() {
  .venv311/bin/python - "$REPORTS" <<'PY'
import sys, pathlib, xml.etree.ElementTree as ET
passed = failed = skipped = 0
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.xml")):
    for suite in ET.parse(f).getroot().iter("testsuite"):
        tests = int(suite.get("tests", 0))
        bad = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skip = int(suite.get("skipped", 0))
        passed += tests - bad - skip
        failed += bad
        skipped += skip
print(f"{passed} passed, {failed} failed, {skipped} skipped")
PY
}

main() {
  cd "$ROOT"
  rm -rf "$REPORTS"
  mkdir -p "$REPORTS"
  local -a groups=("$@")
  [[ ${#groups[@]} -gt 0 ]] || groups=(companion ha e2e)
  local status=0 group
  for group in "${groups[@]}"; do
    [[ -d "tests/$group" ]] || { echo "tests: no tests/$group"; continue; }
    run_group "$group" || status=1
  done
  summary
  return "$status"
}

main "$@"
