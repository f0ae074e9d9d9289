#!/usr/bin/env bash
# lab/systemd-root.sh - the Debian 12 directory image that boots systemd as
# PID 1 under systemd-nspawn in the lab VM (tests/kernel/test_systemd.py).
#
# Theory of operation: the shipped unit (systemd/qkdgate.service) is only
# believable under a real systemd, and the lab VM's init is virtme-ng's, not
# systemd. So the VM boots this image with `systemd-nspawn --boot
# --volatile=overlay` (the image stays read-only, mounted from a squashfs;
# the container writes to a tmpfs layer), inside the gateway's network
# namespace.
#
# 1. base (once, cached): `debootstrap --variant=minbase` of bookworm with
#    systemd, python3, python3-venv, ca-certificates, iproute2; then the
#    README's "Installation" steps: a venv in /opt/qkdgate, `pip install` of
#    this checkout (wheels built on the host: the chroot has no index),
#    /etc/modules-load.d/qkdgate.conf. Units a lab container does not need
#    are masked so the boot is short under TCG. Packed as rootfs.squashfs.
# 2. package (per checkout content, cached): the checkout's qkdgate wheel
#    unpacked into pkg/HASH (HASH = sha256 of the tracked and untracked,
#    not ignored source files); the test binds pkg/HASH/qkdgate over the
#    image's installed package, so the container runs the code under test
#    without rebuilding the venv and without one worktree's run changing
#    another's. The shipped unit file is bound from the checkout unchanged.
#
# Built by tools/test-kernel.sh unless QKDGATE_SYSTEMD_TESTS=0. Cost measured on
# the shared 2-core lab host: base 260 s once (network), squashfs 4 s (99 MB),
# package ~20 s per source change, a re-run with nothing to do well under a
# second.
#
# usage: lab/systemd-root.sh            (root) build what is missing, print the package dir
#        lab/systemd-root.sh --pkg-dir  print this checkout's package dir, build nothing
# env:   LAB_HOME (/var/lib/qkdgate-lab)  LAB_DEBIAN_MIRROR (the host's deb.debian.org)
set -euo pipefail
LAB_HOME=${LAB_HOME:-/var/lib/qkdgate-lab}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
SYS=$LAB_HOME/systemd-root
ROOTFS=$SYS/rootfs
BASE_VERSION=1      # bump when the base recipe below changes
PKG_VERSION=2       # bump when the package recipe changes (it is part of the hash)
MIRROR=${LAB_DEBIAN_MIRROR:-http://deb.debian.org/debian}
log() { echo "systemd-root: $*" >&2; }
die() { echo "systemd-root: ERROR: $*" >&2; exit 126; }

# The source files that make up the installed package, hashed in a fixed order.
# The folders are pyproject's package-dir mapping, read from it (a hard-coded
# list missed keyservice/ when it was added, and pip then failed).
pkg_dirs() {
  python3 -c 'import sys, tomllib; print(*sorted(set(tomllib.load(open(sys.argv[1], "rb"))["tool"]["setuptools"]["package-dir"].values())))' \
    "$ROOT/pyproject.toml"
}
src_files() {
  # shellcheck disable=SC2046  # one word per folder
  (cd "$ROOT" && git ls-files -co --exclude-standard -- pyproject.toml README.md $(pkg_dirs) \
     | LC_ALL=C sort)
}
src_hash() {
  (cd "$ROOT" && { echo "recipe $PKG_VERSION"
                   src_files | while read -r f; do [[ -f $f ]] && { echo "$f"; cat "$f"; }; done; } \
     | sha256sum | cut -c1-20)
}
PKG=$SYS/pkg/$(src_hash)

if [[ ${1:-} == --pkg-dir ]]; then echo "$PKG"; exit 0; fi
[[ $(id -u) == 0 ]] || die "run as root (debootstrap, chroot)"
mkdir -p "$SYS/pkg"
exec 9>"$SYS/.lock"
flock 9      # one builder at a time: every engineer shares LAB_HOME

# ------------------------------------------------------------ host packages
missing=()
for p in debootstrap systemd-container squashfs-tools; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "apt: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[[ -x $ROOT/.venv/bin/pip ]] || die "$ROOT/.venv missing: run tools/bootstrap.sh first"

# Wheels of this checkout and its dependencies, built from a clean copy of the
# source (pip would write build/ and *.egg-info into the checkout).
build_wheels() {   # $1 = output dir
  local src; src=$(mktemp -d "$SYS/.src.XXXX")
  (cd "$ROOT" && src_files | while read -r f; do [[ -f $f ]] && echo "$f"; done \
     | cpio -pdm --quiet "$src")
  "$ROOT/.venv/bin/pip" wheel -q -w "$1" "$src" >"$SYS/pip.log" 2>&1 \
    || { tail -n 20 "$SYS/pip.log" >&2; rm -rf "$src"; die "pip wheel failed"; }
  rm -rf "$src"
  ls "$1"/qkdgate-*.whl >/dev/null 2>&1 || die "no qkdgate wheel built"
}

# ------------------------------------------------------------ 1. base image
if [[ ! -f $ROOTFS/.qkdgate-base || $(<"$ROOTFS/.qkdgate-base") != "$BASE_VERSION" ]]; then
  T0=$SECONDS
  TMPR=$(mktemp -d "$SYS/.rootfs.XXXX")
  cleanup_tmp() { mountpoint -q "$TMPR/proc" && umount "$TMPR/proc"; rm -rf "$TMPR"; }
  trap cleanup_tmp EXIT
  log "base: debootstrap bookworm from $MIRROR (once; a few minutes)"
  debootstrap --variant=minbase \
      --include=systemd,systemd-sysv,python3,python3-venv,ca-certificates,iproute2 \
      bookworm "$TMPR" "$MIRROR" >"$SYS/debootstrap.log" 2>&1 \
      || { tail -n 20 "$SYS/debootstrap.log" >&2; die "debootstrap failed"; }
  mkdir -p "$TMPR/tmp/wheels"
  build_wheels "$TMPR/tmp/wheels"
  mount -t proc proc "$TMPR/proc"
  # README "Installation", in the image (apt-get install was debootstrap's --include)
  chroot "$TMPR" /bin/sh -ec '
    python3 -m venv /opt/qkdgate
    /opt/qkdgate/bin/pip install -q --no-index --find-links /tmp/wheels qkdgate
    install -d -m 0700 /etc/qkdgate /var/lib/qkdgate
    printf "esp4\nesp6\nxfrm_user\nmacsec\n" > /etc/modules-load.d/qkdgate.conf
    # a lab container: no consoles to log in on, no timers, no clock sync
    for u in getty@tty1.service console-getty.service systemd-timesyncd.service \
             apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
             systemd-tmpfiles-clean.timer e2scrub_all.timer fstrim.timer \
             systemd-networkd.service systemd-resolved.service systemd-networkd-wait-online.service; do
      ln -sf /dev/null /etc/systemd/system/$u
    done
    echo qkdgate-lab > /etc/hostname
    : > /etc/machine-id
    rm -rf /tmp/wheels /var/cache/apt/archives/*.deb /var/lib/apt/lists/*'
  umount "$TMPR/proc"
  echo "$BASE_VERSION" > "$TMPR/.qkdgate-base"
  rm -rf "$ROOTFS" "$SYS/pkg"/*
  mv "$TMPR" "$ROOTFS"
  trap - EXIT
  log "base: built in $((SECONDS - T0)) s ($(du -sh "$ROOTFS" | cut -f1))"
fi

# The VM reads the image as one squashfs file through a loop device: the
# guest then caches it in RAM, where a directory over 9p costs a host round
# trip for every stat and read (a Python start took minutes under TCG).
# lz4: the cheapest to decompress in an emulated CPU.
SQ=$SYS/rootfs.squashfs
if [[ ! -f $SQ || $(cat "$SQ.stamp" 2>/dev/null) != "$BASE_VERSION" ]]; then
  T0=$SECONDS
  rm -f "$SQ.tmp"
  mksquashfs "$ROOTFS" "$SQ.tmp" -comp lz4 -no-xattrs -noappend -quiet -no-progress \
      -e usr/share/doc usr/share/man usr/share/locale usr/share/info var/cache/debconf >/dev/null
  mv "$SQ.tmp" "$SQ"
  echo "$BASE_VERSION" > "$SQ.stamp"
  log "squashfs: $SQ in $((SECONDS - T0)) s ($(du -sh "$SQ" | cut -f1))"
fi

# ------------------------------------------------------------ 2. this checkout's package
if [[ ! -f $PKG/.done ]]; then
  T0=$SECONDS
  WH=$(mktemp -d "$SYS/.wh.XXXX")
  build_wheels "$WH"
  rm -rf "$PKG"; mkdir -p "$PKG"
  (cd "$PKG" && python3 -m zipfile -e "$WH"/qkdgate-*.whl .)
  rm -rf "$WH"
  [[ -d $PKG/qkdgate && -d $ROOTFS/opt/qkdgate/lib/python3.11/site-packages/qkdgate ]] \
    || die "package layout unexpected in $PKG"
  find "$PKG" -name '*.py' -exec chmod 0644 {} +
  # Byte-compile now: the container sees the package read-only, so without
  # .pyc every start would compile it again (seconds under TCG). CPython
  # 3.11.x share one bytecode format, so the host's 3.11 serves Debian's.
  "$ROOT/.venv/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
    || die "the host venv is not Python 3.11: its .pyc would not match the image's"
  "$ROOT/.venv/bin/python" -m compileall -q -j 0 "$PKG/qkdgate" >/dev/null
  touch "$PKG/.done"
  # keep the newest few packages (other worktrees may be using theirs)
  ls -1dt "$SYS"/pkg/*/ | tail -n +17 | xargs -r rm -rf
  log "package: $PKG in $((SECONDS - T0)) s"
fi
echo "$PKG"
