#!/usr/bin/env bash
# The gates (docs/architecture.md, "Gates"), run by tests/gates/test_lint.py in the host tests:
#   1. lint-imports  the layer rule (.importlinter)
#   2. ruff check    the rule set in pyproject.toml [tool.ruff]
#   3. mypy --strict on the shipped package (pyproject.toml [tool.mypy])
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

# What ruff and mypy check. This list grows as each area reaches zero findings:
# an owner adds their package here in the commit that brings it to zero. Paths
# not listed are skipped by ruff and by mypy (mypy still reads them to learn
# their types, but reports nothing in them). lint-imports always checks
# everything. At the end every shipped package is listed.
CHECKED=(
  qkdgate/__init__.py qkdgate/__main__.py qkdgate/errors.py qkdgate/interfaces.py
  qkdgate/private_file.py
  keymix
  adapters
  tunnels
  gateway/config
  gateway/protocol
  gateway/cli/__init__.py gateway/cli/main.py gateway/cli/check_config.py gateway/cli/keygen.py
  gateway/cli/kme_sim.py gateway/cli/rekey.py gateway/cli/run.py gateway/cli/status.py
  gateway/demo/__init__.py gateway/demo/command.py gateway/demo/config.py gateway/demo/net.py
  gateway/demo/run.py gateway/demo/traffic.py gateway/demo/kernelwatch.py gateway/demo/view.py
  gateway/daemon/journal.py
  gateway/telemetry
  qkdgate/testing
  gateway/daemon/__init__.py gateway/daemon/build.py gateway/daemon/control.py
  gateway/daemon/daemon.py gateway/daemon/peer.py gateway/daemon/qkd.py gateway/daemon/reload.py
  gateway/daemon/sdnotify.py gateway/daemon/udp.py
  tests
  bench
  tools
)

mirror=$ROOT/build/typecheck
rm -rf "$mirror"
mkdir -p "$mirror/qkdgate"
for f in qkdgate/*; do ln -s "$ROOT/$f" "$mirror/qkdgate/"; done
for d in gateway keymix tunnels adapters; do ln -s "$ROOT/$d" "$mirror/qkdgate/$d"; done

# A repository path -> the same file or folder in the mirror.
to_mirror() {
  case $1 in
    qkdgate/*) echo "$mirror/$1" ;;
    gateway|gateway/*|keymix|keymix/*|tunnels|tunnels/*|adapters|adapters/*) echo "$mirror/qkdgate/$1" ;;
    *) echo "$ROOT/$1" ;;
  esac
}

echo "lint: ruff and mypy check: ${CHECKED[*]}"
rc=0

echo "-- lint-imports"
# Run from inside the mirror: lint-imports puts the working directory first on
# sys.path, and the repository's own qkdgate/ holds only the core.
(cd "$mirror" && PYTHONPATH=$mirror "$BIN/lint-imports" "$ROOT/.importlinter" --no-cache) \
  || rc=1

echo "-- ruff check"
"$BIN/ruff" check --no-cache --force-exclude --output-format concise "${CHECKED[@]}" || rc=1

echo "-- mypy --strict"
targets=()
for p in "${CHECKED[@]}"; do
  case $p in
    qkdgate/*|gateway*|keymix*|tunnels*|adapters*) targets+=("$(to_mirror "$p")") ;;
  esac
done
# follow-imports=silent: modules not (yet) in CHECKED are analysed for their
# types but their own findings are not reported.
out=$(cd "$mirror" && MYPYPATH=$mirror "$BIN/mypy" --config-file "$ROOT/pyproject.toml" \
        --follow-imports=silent --cache-dir "$ROOT/build/mypy-cache" "${targets[@]}" 2>&1)
mrc=$?
sed -E -e "s#^$mirror/##" -e 's#^qkdgate/(gateway|keymix|tunnels|adapters)/#\1/#' <<<"$out"
[[ $mrc == 0 ]] || rc=1

if [[ $rc != 0 ]]; then echo "lint: FAILED (see above)" >&2; fi
exit $rc
