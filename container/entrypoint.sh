#!/bin/sh
# qkdgate container entrypoint: what systemd's ExecStopPost=qkdgate failsafe
# gives the unit, for a container (issue 17 finding 8b).
#
# Theory of operation: in a container nothing runs after the daemon dies, so
# a SIGKILL, an OOM kill or a crash would leave its SAs in the kernel; a
# MACsec SA has no lifetime and would protect (and accept) traffic for ever.
# This script is PID 1 and the daemon's parent. It starts `qkdgate run ...`,
# passes TERM, INT, HUP (reload), USR1, USR2 and QUIT on to it, waits, and
# when the daemon ended by a signal or a non-zero exit runs `qkdgate
# failsafe` (plus $QKDGATE_FAILSAFE_ARGS) before exiting with the daemon's
# status. A clean exit (0, e.g. after SIGTERM) runs nothing: the daemon chose
# what to leave, as with `failsafe --systemd` after SERVICE_RESULT=success.
#
# Why a shell and not a Python supervisor: it is the smallest process that
# can do this (dash, about 1 MB resident), so the kernel's OOM killer, which
# picks the largest process in the container's cgroup, picks the daemon and
# not its supervisor; and it has no imports that could fail. What it cannot
# cover: a SIGKILL of PID 1 itself (`docker kill`, or `docker stop` past its
# timeout) ends the whole container at once; give `docker stop` a timeout
# above the daemon's shutdown, or run `qkdgate failsafe` from the host
# (docs/security.md, "Operator mistakes").
#
# Any other command (`status`, `check-config`, `failsafe`...) is exec'd
# unchanged: a failing `status` must never trigger a failsafe that would
# sweep a running daemon's SAs in a shared network namespace.
set -u

if [ "${1:-}" != run ]; then
    exec qkdgate "$@"
fi

# The traps go in before the daemon starts: a signal that arrived in between
# would otherwise take its default action on this shell (TERM, HUP: exit),
# leaving the daemon orphaned, unsupervised and without a failsafe. A signal
# that arrives before the daemon exists is passed on once it does.
pid=
pending=
got_signal=0
forward() {
    got_signal=1
    if [ -n "$pid" ]; then
        kill -s "$1" "$pid" 2>/dev/null || true
    else
        pending=$1
    fi
}
for sig in TERM INT HUP USR1 USR2 QUIT; do
    # shellcheck disable=SC2064  # expand $sig now: one handler per signal
    trap "forward $sig" "$sig"
done

qkdgate "$@" &
pid=$!
if [ -n "$pending" ]; then
    kill -s "$pending" "$pid" 2>/dev/null || true
fi

# POSIX wait: a trapped signal makes wait return >128 at once, then its trap
# runs. So after a forwarded signal, wait again: if the daemon lives on this
# blocks, and if it has ended the shell still holds its status (dash answers
# again; a shell that has already reported it says 127: keep the last one).
rc=
while :; do
    got_signal=0
    wait "$pid"
    status=$?
    if [ "$status" -eq 127 ] && [ -n "$rc" ]; then
        break
    fi
    rc=$status
    if [ "$got_signal" = 0 ] || [ "$rc" -le 128 ]; then
        break
    fi
done

if [ "$rc" -ne 0 ]; then
    echo "qkdgate-entrypoint: daemon ended with status $rc; running qkdgate failsafe" >&2
    # shellcheck disable=SC2086  # the extra arguments are split on purpose
    qkdgate failsafe ${QKDGATE_FAILSAFE_ARGS:-} \
        || echo "qkdgate-entrypoint: qkdgate failsafe failed" >&2
fi
exit "$rc"
