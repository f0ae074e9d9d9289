#!/usr/bin/env bash
# lab/run.sh - run one command inside the kernel lab VM, in the project checkout.
#
# Theory of operation: boots the kernel lab/setup.sh extracted with
# virtme-ng under QEMU TCG (nested KVM aborts qemu on the machines we met,
# so KVM is opt-in). The guest sees the host root filesystem, so the
# checkout and its .venv are used as they are. vng's own stdout plumbing
# needs udev links this kind of host lacks, so the guest writes output and
# exit code to files in a shared read-write directory, and this script
# streams the output while the VM runs.
#
# Adapted from the qkdgate team's exploratory lab recipe (lab-run.sh).
#
# usage: lab/run.sh [--] COMMAND [ARGS...]     (root; cwd in the guest = checkout)
# exit:  the command's code (0..123); 124 timeout; 125 the VM never ran the
#        command or crashed; 126 lab not set up / bad usage.
# Keep LAB_HOME out of /var/tmp, /var/cache and /tmp: virtme-ng's guest init
# mounts empty tmpfs there, which would hide the kernel modules.
# env:   LAB_HOME (/var/lib/qkdgate-lab)  LAB_TIMEOUT seconds (1200)
#        LAB_MEM (2G)  LAB_CPUS (2)  LAB_KVM (0)  LAB_OUT (fresh dir under LAB_HOME/out)
#        LAB_MODULES (modules loaded before the command)  LAB_QUIET (0)
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
die() { echo "lab-run: ERROR: $*" >&2; exit 126; }

[[ ${1:-} == -- ]] && shift
[[ $# -ge 1 ]] || die "usage: lab/run.sh [--] COMMAND [ARGS...]"
LAB_HOME=${LAB_HOME:-/var/lib/qkdgate-lab}
LAB_TIMEOUT=${LAB_TIMEOUT:-1200}
LAB_MEM=${LAB_MEM:-2G}
LAB_CPUS=${LAB_CPUS:-2}
LAB_KVM=${LAB_KVM:-0}
# aesni_intel is not auto-loaded (no udev in the guest): load it for speed.
LAB_MODULES=${LAB_MODULES-esp4 esp6 xfrm_user xfrm_interface macsec veth bridge aesni_intel}
LAB_QUIET=${LAB_QUIET:-0}

[[ $(id -u) == 0 ]] || die "run as root"
VNG=$ROOT/.venv/bin/vng
[[ -x $VNG ]] || die "virtme-ng missing: run lab/setup.sh"
KIMG=$(cat "$LAB_HOME/kernel/current" 2>/dev/null) || true
[[ -n $KIMG && -r $KIMG ]] || die "no lab kernel: run lab/setup.sh"
for b in qemu-system-x86_64 busybox timeout; do
  command -v "$b" >/dev/null || die "'$b' missing: run lab/setup.sh"
done
KVER=$(basename "$KIMG"); KVER=${KVER#vmlinuz-}

OUT=${LAB_OUT:-$LAB_HOME/out/$(date +%Y%m%d-%H%M%S)-$$}
mkdir -p "$OUT" || die "cannot create $OUT"
OUT=$(realpath "$OUT")
rm -f "$OUT/rc" "$OUT/output.log" "$OUT/console.log" "$OUT/.guest-started"

GUEST=$OUT/.guest.sh
{
  echo '#!/bin/bash'
  printf 'export LAB_OUT=%q LAB_KVER=%q PYTHONDONTWRITEBYTECODE=1\n' "$OUT" "$KVER"
  printf 'export PATH=%q/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n' "$ROOT"
  echo 'touch "$LAB_OUT/.guest-started"'
  # lab/bin/virtme-run mounts the root with 9p cache=loose: say so when it did not
  echo 'grep -qE "^[^ ]+ / 9p [^ ]*loose" /proc/mounts || echo "lab-run(guest): WARNING: the root is not mounted cache=loose: every file access goes to the host (slow)" >>"$LAB_OUT/output.log"'
  printf 'cd %q || exit 125\n' "$ROOT"
  printf 'for m in %s; do modprobe "$m" || echo "lab-run(guest): modprobe $m failed"; done >>"$LAB_OUT/output.log" 2>&1\n' "$LAB_MODULES"
  printf '%q ' "$@"; echo '>>"$LAB_OUT/output.log" 2>&1 </dev/null'
  echo 'rc=$?; echo $rc > "$LAB_OUT/rc.tmp" && mv "$LAB_OUT/rc.tmp" "$LAB_OUT/rc"; sync'
  echo 'exit $rc'
} > "$GUEST"
chmod +x "$GUEST"

# The checkout must be writable in the guest only where tests write: they
# use LAB_OUT and /tmp (tmpfs); .pytest_cache is disabled by the caller.
VNG_ARGS=(--verbose --run "$KIMG" --force-9p --memory "$LAB_MEM" --cpus "$LAB_CPUS"
          --rwdir "$OUT" --exec "bash $GUEST")
[[ $LAB_KVM == 1 ]] || VNG_ARGS+=(--disable-kvm)
echo "lab-run: kernel $KVER, output $OUT, timeout ${LAB_TIMEOUT}s" >&2
T0=$SECONDS
TAIL_PID=""
if [[ $LAB_QUIET != 1 ]]; then
  touch "$OUT/output.log"
  tail -n +1 -F "$OUT/output.log" 2>/dev/null &
  TAIL_PID=$!
fi
cleanup() { [[ -n $TAIL_PID ]] && kill "$TAIL_PID" 2>/dev/null; TAIL_PID=""; }
trap cleanup EXIT
trap 'echo "lab-run: interrupted" >&2; exit 130' INT TERM

# lab/bin first: its virtme-run mounts the guest root with 9p cache=loose
timeout -k 15 "$LAB_TIMEOUT" env PATH="$HERE/bin:$ROOT/.venv/bin:$PATH" "$VNG" "${VNG_ARGS[@]}" \
    </dev/null >"$OUT/console.log" 2>&1
VRC=$?
sleep 0.5
cleanup
if [[ $VRC == 124 || $VRC == 137 ]]; then
  echo "lab-run: TIMEOUT after ${LAB_TIMEOUT}s (console: $OUT/console.log)" >&2
  tail -n 15 "$OUT/console.log" >&2
  exit 124
fi
if [[ ! -f $OUT/rc ]]; then
  if [[ -f $OUT/.guest-started ]]; then
    echo "lab-run: command started but no exit code recorded (guest crash?) vng rc=$VRC" >&2
  else
    echo "lab-run: the VM never reached the command (vng rc=$VRC): boot failure?" >&2
  fi
  tail -n 25 "$OUT/console.log" >&2
  exit 125
fi
RC=$(<"$OUT/rc")
echo "lab-run: exit code $RC after $((SECONDS - T0)) s" >&2
exit "$RC"
