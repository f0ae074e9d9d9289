#!/usr/bin/env bash
# Make a local docker.io/library/debian:bookworm-slim image from Debian
# packages, for machines that cannot pull from a container registry.
#
# Why: CI reaches Debian's apt mirrors and PyPI but no container registry, and
# no Docker engine runs. buildah (Debian package) builds images as root with
# the vfs storage driver and chroot isolation. We debootstrap a minbase
# bookworm root file system, tar it, and build a two-line FROM scratch image
# tagged with the name the real Dockerfile uses, so the Dockerfile builds
# unchanged with --pull=never.
#
# Idempotent: does nothing if the tag already exists in the buildah store.
# The store lives under /var/tmp so it survives between runs (override with
# QKDGATE_BUILDAH_ROOT). Needs root, buildah and debootstrap.
set -euo pipefail
TAG=docker.io/library/debian:bookworm-slim
ROOTDIR=${QKDGATE_BUILDAH_ROOT:-/var/tmp/qkdgate-buildah}
MIRROR=${QKDGATE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BUILDAH=(buildah --root "$ROOTDIR/storage" --runroot "$ROOTDIR/run" --storage-driver vfs)
log() { echo "make-base-image: $*" >&2; }

if [[ $(id -u) != 0 ]]; then log "needs root (debootstrap, buildah chroot)"; exit 126; fi
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { log "missing $tool (apt-get install $tool)"; exit 126; }
done
mkdir -p "$ROOTDIR"
if "${BUILDAH[@]}" inspect --type image "$TAG" >/dev/null 2>&1; then
  log "$TAG already present in $ROOTDIR"
  exit 0
fi

work=$(mktemp -d /var/tmp/qkdgate-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
t0=$SECONDS
log "debootstrap --variant=minbase bookworm (about 30 s)"
debootstrap --variant=minbase bookworm "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
  tail -20 "$work/debootstrap.log" >&2; exit 1; }
# Trim what a slim image does not carry; apt lists are fetched again by the
# Dockerfile's own apt-get update.
rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
tar --numeric-owner -C "$work/rootfs" -cf "$work/rootfs.tar" .
printf 'FROM scratch\nADD rootfs.tar /\nCMD ["bash"]\n' >"$work/Containerfile"
"${BUILDAH[@]}" bud --isolation chroot --quiet -f "$work/Containerfile" -t "$TAG" "$work" >/dev/null
log "built $TAG in $((SECONDS - t0)) s"
