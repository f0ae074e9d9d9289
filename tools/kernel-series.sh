#!/usr/bin/env bash
# tools/kernel-series.sh [-n RUNS] [-c HOGS] [-o DIR] [-- PYTEST ARGS]
#
# Issue 10 item 1: the whole kernel stage, RUNS times in a row (default 5),
# while a CPU hog (stress-ng --cpu HOGS, default 2: every host core) competes
# with the lab VM. No retries: the series stops at the first failing run, and
# that run's log is the bug report. Each run is tools/test-kernel.sh exactly
# as ./run-tests calls it (extra arguments go to pytest, e.g. -k demo while
# iterating; the claim needs the whole suite). Prints one line per run (exit
# code, wall time, pytest's summary, host load) and writes the logs to DIR.
# stress-ng is Debian's (apt-get install stress-ng); it is a tool of this
# series only, so the test command does not install it.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
runs=5 hogs=2 out=""
while getopts "n:c:o:" opt; do
  case $opt in
    n) runs=$OPTARG ;; c) hogs=$OPTARG ;; o) out=$OPTARG ;;
    *) echo "usage: $0 [-n RUNS] [-c HOGS] [-o DIR] [-- PYTEST ARGS]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ $runs =~ ^[1-9][0-9]*$ && $hogs =~ ^[0-9]+$ ]] || { echo "kernel-series: -n and -c take numbers" >&2; exit 2; }
command -v stress-ng >/dev/null || [[ $hogs == 0 ]] \
  || { echo "kernel-series: stress-ng missing (apt-get install stress-ng)" >&2; exit 2; }
out=${out:-$ROOT/build/kernel-series-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$out"

hog=""
stop_hog() { [[ -n $hog ]] && kill "$hog" 2>/dev/null && wait "$hog" 2>/dev/null; hog=""; }
trap stop_hog EXIT
if [[ $hogs != 0 ]]; then
  stress-ng --cpu "$hogs" --cpu-method matrixprod --quiet >/dev/null 2>&1 &
  hog=$!
fi

echo "kernel-series: $runs runs of the kernel stage, commit $(git -C "$ROOT" rev-parse --short HEAD)," \
     "hog: stress-ng --cpu $hogs, logs in $out"
passed=0
for i in $(seq 1 "$runs"); do
  log="$out/run$i.log"
  load0=$(cut -d' ' -f1 /proc/loadavg)
  t0=$(date +%s)
  bash "$ROOT/tools/test-kernel.sh" "$@" >"$log" 2>&1
  rc=$?
  t1=$(date +%s)
  summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed)|[0-9]+ failed|[0-9]+ passed' "$log" | tail -1 | tr -d '=')
  printf 'run %d: rc=%d wall=%ds load %s->%s %s\n' "$i" "$rc" $((t1 - t0)) "$load0" \
    "$(cut -d' ' -f1 /proc/loadavg)" "${summary:-(no pytest summary)}" | tee -a "$out/series.txt"
  if [[ $rc != 0 ]]; then
    grep -E '^(FAILED|ERROR) ' "$log" | tee -a "$out/series.txt"
    echo "kernel-series: FAILED at run $i of $runs ($passed in a row passed); log: $log" >&2
    exit 1
  fi
  passed=$((passed + 1))
done
echo "kernel-series: $passed of $runs runs passed in a row under the hog" | tee -a "$out/series.txt"
