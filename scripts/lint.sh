#!/usr/bin/env bash
# Lint everything: ruff (lint + format check), mypy strict, shellcheck.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

shell_files() {
  local f
  for f in install.sh host/ctrlable-build firstboot/*.sh scripts/*.sh .ci/run tests/companion/fakes/*/*; do
    [[ -f "$f" ]] || continue
    if head -n1 "$f" | grep -qE '^#!.*\b(ba)?sh\b'; then printf '%s\n' "$f"; fi
  done
}

main() {
  cd "$ROOT"
  echo "== ruff"
  .venv/bin/ruff check .
  .venv/bin/ruff format --check . >/dev/null || { .venv/bin/ruff format --check .; exit 1; }
  echo "== mypy (strict): companion as Python 3.11, the integration as Python 3.13"
  .venv/bin/mypy
  .venv/bin/mypy --python-version 3.13 custom_components/ctrlable
  echo "== shellcheck"
  command -v shellcheck >/dev/null || { echo "shellcheck missing (apt-get install shellcheck)"; exit 1; }
  mapfile -t files < <(shell_files)
  shellcheck "${files[@]}"
  echo "lint: ok"
}

main "$@"
