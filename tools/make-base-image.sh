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
# Bump when the recipe changes, so cached stand-ins are rebuilt.
RECIPE=2
log() { echo "make-base-image: $*" >&2; }

if [[ $(id -u) != 0 ]]; then log "needs root (debootstrap, buildah chroot)"; exit 126; fi
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { log "missing $tool (apt-get install $tool)"; exit 126; }
done
mkdir -p "$ROOTDIR"
have=$("${BUILDAH[@]}" inspect --type image --format '{{index .Docker.Config.Labels "qkdgate.base-recipe"}}' "$TAG" 2>/dev/null || true)
if [[ $have == "$RECIPE" ]]; then
  log "$TAG already present in $ROOTDIR"
  exit 0
elif [[ -n $have ]] || "${BUILDAH[@]}" inspect --type image "$TAG" >/dev/null 2>&1; then
  log "replacing $TAG (recipe ${have:-?} -> $RECIPE)"
  "${BUILDAH[@]}" rmi -f "$TAG" >/dev/null
fi

work=$(mktemp -d /var/tmp/qkdgate-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
t0=$SECONDS
log "debootstrap --variant=minbase bookworm (about 30 s)"
debootstrap --variant=minbase bookworm "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
  tail -20 "$work/debootstrap.log" >&2; exit 1; }
# Make it what the official -slim image is (debuerreotype --slim): dpkg
# skips docs, man pages and locales, apt keeps no .deb files or caches.
# Then a Dockerfile written for the real image behaves the same here.
r=$work/rootfs
cat >"$r/etc/dpkg/dpkg.cfg.d/docker" <<'EOT'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOT
cat >"$r/etc/apt/apt.conf.d/docker-clean" <<'EOT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOT
echo 'Acquire::Languages "none";' >"$r/etc/apt/apt.conf.d/docker-no-languages"
echo 'APT::Install-Recommends "false";' >"$r/etc/apt/apt.conf.d/docker-no-recommends"
find "$r/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
rm -rf "$r"/usr/share/man/* "$r"/usr/share/info/* "$r"/usr/share/locale/* \
       "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/*
tar --numeric-owner -C "$work/rootfs" -cf "$work/rootfs.tar" .
printf 'FROM scratch\nADD rootfs.tar /\nLABEL qkdgate.base-recipe=%s\nCMD ["bash"]\n' "$RECIPE" \
  >"$work/Containerfile"
"${BUILDAH[@]}" bud --isolation chroot --quiet -f "$work/Containerfile" -t "$TAG" "$work" >/dev/null
log "built $TAG in $((SECONDS - t0)) s"
