#!/usr/bin/env bash
# The gates (docs/architecture.md, "Gates"), run by tests/gates/test_lint.py
# inside the host pytest run:
#   1. lint-imports  the layer rule (.importlinter)
#   2. ruff check .  the whole repository, rule set in pyproject.toml [tool.ruff]
#   3. mypy --strict the whole shipped package qkdgate (pyproject.toml [tool.mypy])
# Each must report zero findings. Exit status is non-zero if any gate fails;
# all three run so one report shows everything.
#
# setuptools maps gateway/, keymix/, tunnels/, adapters/ to qkdgate.* (package-dir
# in pyproject.toml). import-linter and mypy only understand a package that lives
# in one folder, so they run on build/typecheck/qkdgate/: symlinks to the real
# folders, rebuilt on every run. Paths in mypy's report are mapped back to the
# repository's paths.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN=${QKDGATE_VENV:-$ROOT/.venv}/bin

mirror=$ROOT/build/typecheck
rm -rf "$mirror"
mkdir -p "$mirror/qkdgate"
for f in qkdgate/*; do ln -s "$ROOT/$f" "$mirror/qkdgate/"; done
for d in gateway keymix tunnels adapters keyservice; do ln -s "$ROOT/$d" "$mirror/qkdgate/$d"; done

echo "lint: import-linter on qkdgate, ruff on the repository, mypy --strict on qkdgate"
rc=0

echo "-- lint-imports"
# Run from inside the mirror: lint-imports puts the working directory first on
# sys.path, and the repository's own qkdgate/ holds only the core.
(cd "$mirror" && PYTHONPATH=$mirror "$BIN/lint-imports" "$ROOT/.importlinter" --no-cache) \
  || rc=1

echo "-- ruff check ."
"$BIN/ruff" check --no-cache --output-format concise . || rc=1

echo "-- mypy --strict -p qkdgate"
out=$(cd "$mirror" && MYPYPATH=$mirror "$BIN/mypy" --config-file "$ROOT/pyproject.toml" \
        --cache-dir "$ROOT/build/mypy-cache" -p qkdgate 2>&1)
mrc=$?
sed -E -e "s#^$mirror/##" -e 's#^qkdgate/(gateway|keymix|tunnels|adapters|keyservice)/#\1/#' <<<"$out"
[[ $mrc == 0 ]] || rc=1

if [[ $rc != 0 ]]; then echo "lint: FAILED (see above)" >&2; fi
exit $rc
