#!/usr/bin/env bash
# Shared set-up for ./run-tests and ./run-demo: Debian packages from
# tools/apt-packages.txt (only the missing ones; needs root), then a venv in
# .venv with qkdgate and its test extras installed in editable mode.
# Re-running is cheap: every step checks before it acts.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
log() { echo "bootstrap: $*" >&2; }

mapfile -t want < <(sed -e 's/#.*//' -e '/^\s*$/d' tools/apt-packages.txt)
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) != 0 ]]; then
    echo "bootstrap: missing Debian packages: ${missing[*]} (run as root, or apt-get install them)" >&2
    exit 1
  fi
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${QKDGATE_PYTHON:-python3}
VENV=$ROOT/.venv
STAMP=$VENV/.qkdgate-stamp
want_stamp=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [[ ! -x $VENV/bin/python || ! -f $STAMP || $(<"$STAMP") != "$want_stamp" ]]; then
  log "creating $VENV and installing qkdgate[test,lab]"
  [[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e ".[test,lab]"
  echo "$want_stamp" > "$STAMP"
fi
