#!/usr/bin/env bash
# Stage "model" of ./run-tests: the ProVerif model of the peer protocol
# (tests/model/, docs/analysis.md). Every query must resolve as
# docs/analysis.md records it, within a CPU budget per query and in all.
# ProVerif: `proverif` on PATH, else shared/tools/proverif (ProVerif 2.05,
# built once with Debian's OCaml) from $ROOT/../shared or $QKDGATE_SHARED.
# Without either the stage fails in CI (CI=true) and is skipped elsewhere.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
pv=""
if command -v proverif >/dev/null 2>&1; then
  pv=proverif
else
  for shared in "$ROOT/../shared" "${QKDGATE_SHARED:-}"; do
    if [[ -n $shared && -x $shared/tools/proverif ]]; then pv="$shared/tools/proverif"; break; fi
  done
fi
if [[ -z $pv ]]; then
  msg="ProVerif not found (no proverif on PATH, no shared/tools/proverif beside the clone or in \$QKDGATE_SHARED); install it with: opam install proverif"
  if [[ ${CI:-} == true ]]; then echo "test-model: $msg" >&2; exit 1; fi
  echo "test-model: SKIPPED: $msg"
  exit 0
fi
# shared/tools/proverif builds ProVerif on first use and then copies the binary
# into its cache. run_model.py runs queries in parallel, so on a fresh machine
# two first uses raced: one copied over the binary the other was executing
# ("cp: ... Text file busy", and that entry's queries failed). Build it once,
# alone, before the parallel runs.
if ! "$pv" -help >/dev/null 2>&1; then
  echo "test-model: $pv -help failed; ProVerif does not run here" >&2
  "$pv" -help >&2 || true
  exit 1
fi
py=python3
[[ -x .venv/bin/python ]] && py=.venv/bin/python
# Limits in ProVerif CPU seconds (a busy machine slows the stage, it does not
# fail it): 240 s per query, 1800 s in all (15 minutes on 2 cores).
exec "$py" tests/model/run_model.py --proverif "$pv" --per-query-cpu 240 --total-cpu 1800 "$@"
