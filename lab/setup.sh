#!/usr/bin/env bash
# lab/setup.sh - idempotent installer for qkdgate's kernel lab (Debian 12).
#
# Theory of operation: the development and CI kernels may lack ESP, GCM and
# MACsec, so kernel tests run in a throw-away QEMU VM booting Debian's own
# distro kernel (all of them as modules). The kernel package is extracted
# with `apt-get download` + `dpkg-deb -x`, never installed (no initramfs or
# bootloader hooks). virtme-ng (`vng`, from the project's `lab` extra in
# .venv) boots it with the host root filesystem shared, so the checkout and
# .venv are visible inside the guest. Every step checks before it acts, so
# re-running costs well under a second.
#
# Adapted from the qkdgate team's exploratory lab recipe (setup-lab.sh),
# which recorded the facts this relies on (TCG only: nested KVM aborts qemu).
#
# usage: lab/setup.sh                       (root)
# env:   LAB_HOME=/var/lib/qkdgate-lab      where kernel/ and out/ go
#        LAB_SMOKE=0|1                      boot once and check modules (default 0)
set -euo pipefail
LAB_HOME=${LAB_HOME:-/var/lib/qkdgate-lab}
LAB_SMOKE=${LAB_SMOKE:-0}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
export DEBIAN_FRONTEND=noninteractive
log() { echo "lab-setup: $*" >&2; }
die() { echo "lab-setup: ERROR: $*" >&2; exit 126; }

[[ $(id -u) == 0 ]] || die "run as root (apt-get; the guest needs root for netns and modprobe)"
[[ $(uname -m) == x86_64 ]] || die "x86_64 only"
mkdir -p "$LAB_HOME"

# ------------------------------------------------------------ 1. apt packages
# qemu + busybox/kmod/cpio for virtme-ng's initramfs; file/binutils let vng
# identify the kernel image; iproute2/tcpdump/iperf3/ping are used by tests
# and bench for setup and observation (never in the product path);
# wireguard-tools (wg, wg-quick) runs real WireGuard in tests/kernel/test_wireguard.py.
APT_PKGS=(qemu-system-x86 kmod busybox-static cpio file binutils iproute2 iputils-ping
          tcpdump iperf3 bridge-utils wireguard-tools)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
APT_UPDATED=0
apt_update() { [[ $APT_UPDATED == 1 ]] || { apt-get update -qq; APT_UPDATED=1; }; }
if ((${#missing[@]})); then
  log "apt: installing ${missing[*]}"
  apt_update
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# strongSwan for tests/kernel/test_strongswan.py (issue 21): the test starts
# its own charon per gateway namespace; Debian's service must never run on
# this host. policy-rc.d (dpkg's convention: 101 = do not start) keeps the
# install from starting it; the unit is masked and the SysV links disabled,
# so nothing starts it at boot either. The guest shares this root.
SWAN_PKGS=(strongswan-charon strongswan-swanctl libstrongswan-standard-plugins)
swan_missing=()
for p in "${SWAN_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || swan_missing+=("$p")
done
if ((${#swan_missing[@]})); then
  log "apt: installing ${swan_missing[*]} (service not started)"
  apt_update
  had_policy=0; [[ -e /usr/sbin/policy-rc.d ]] && had_policy=1
  [[ $had_policy == 1 ]] || printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  rc=0; apt-get install -y -qq --no-install-recommends "${swan_missing[@]}" >/dev/null || rc=$?
  [[ $had_policy == 1 ]] || rm -f /usr/sbin/policy-rc.d
  ((rc == 0)) || die "apt-get install ${swan_missing[*]} failed"
fi
for u in strongswan-starter.service strongswan.service; do
  if [[ -e /lib/systemd/system/$u && $(systemctl --root=/ is-enabled "$u" 2>/dev/null) != masked ]]; then
    systemctl --root=/ mask "$u" >/dev/null 2>&1 || die "cannot mask $u"
  fi
done
if ls /etc/rc[2-5].d/S*ipsec >/dev/null 2>&1; then update-rc.d ipsec disable >/dev/null 2>&1 || true; fi
[[ -x /usr/lib/ipsec/charon ]] || die "charon missing after install"

# keepalived for tests/kernel/test_ha_keepalived.py (issue 12): the test starts its own
# keepalived per gateway namespace (VRRP for an HA pair); Debian's service
# must never run on this host: installed like strongSwan above (not started,
# unit masked, SysV links disabled).
if ! dpkg-query -W -f='${Status}' keepalived 2>/dev/null | grep -q 'install ok installed'; then
  log "apt: installing keepalived (service not started)"
  apt_update
  had_policy=0; [[ -e /usr/sbin/policy-rc.d ]] && had_policy=1
  [[ $had_policy == 1 ]] || printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  rc=0; apt-get install -y -qq --no-install-recommends keepalived >/dev/null || rc=$?
  [[ $had_policy == 1 ]] || rm -f /usr/sbin/policy-rc.d
  ((rc == 0)) || die "apt-get install keepalived failed"
fi
if [[ -e /lib/systemd/system/keepalived.service && $(systemctl --root=/ is-enabled keepalived.service 2>/dev/null) != masked ]]; then
  systemctl --root=/ mask keepalived.service >/dev/null 2>&1 || die "cannot mask keepalived.service"
fi
if ls /etc/rc[2-5].d/S*keepalived >/dev/null 2>&1; then update-rc.d keepalived disable >/dev/null 2>&1 || true; fi
[[ -x /usr/sbin/keepalived ]] || die "keepalived missing after install"

# ------------------------------------------------------------ 2. distro kernel
kpkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
KPKG=$(kpkg); if [[ -z $KPKG ]]; then apt_update; KPKG=$(kpkg); fi
[[ -n $KPKG ]] || die "cannot resolve linux-image-amd64 (apt sources?)"
KVER=${KPKG#linux-image-}
KROOT=$LAB_HOME/kernel/root
if [[ -f $KROOT/boot/vmlinuz-$KVER && -s $KROOT/lib/modules/$KVER/modules.dep ]]; then
  :
else
  log "kernel: downloading $KPKG"
  mkdir -p "$LAB_HOME/kernel/debs"
  (cd "$LAB_HOME/kernel/debs" && { apt-get download "$KPKG" 2>/dev/null || { apt_update; apt-get download "$KPKG"; }; })
  DEB=$(ls -1t "$LAB_HOME"/kernel/debs/"${KPKG}"_*.deb | head -n1)
  TMPX=$(mktemp -d "$LAB_HOME/kernel/.x.XXXX")
  dpkg-deb -x "$DEB" "$TMPX"
  depmod -a -b "$TMPX" "$KVER"
  mkdir -p "$KROOT/boot" "$KROOT/lib/modules"
  rm -rf "$KROOT/lib/modules/$KVER"
  mv "$TMPX/lib/modules/$KVER" "$KROOT/lib/modules/$KVER"
  mv "$TMPX"/boot/* "$KROOT/boot/"
  rm -rf "$TMPX" "$DEB"
fi
for m in net/ipv4/esp4.ko net/ipv6/esp6.ko net/xfrm/xfrm_user.ko drivers/net/macsec.ko crypto/gcm.ko \
         drivers/net/wireguard/wireguard.ko; do
  ls "$KROOT/lib/modules/$KVER/kernel/$m"* >/dev/null 2>&1 || die "module $m missing in the $KVER package"
done
echo "$KROOT/boot/vmlinuz-$KVER" > "$LAB_HOME/kernel/current"

# ------------------------------------------------------------ 3. virtme-ng
# vng comes from the project's venv (pyproject extra "lab"); bootstrap.sh
# installs it. Fall back to installing the pinned extra if it is missing.
if [[ ! -x $ROOT/.venv/bin/vng ]]; then
  [[ -x $ROOT/.venv/bin/pip ]] || die "$ROOT/.venv missing: run tools/bootstrap.sh first"
  log "venv: installing the lab extra (virtme-ng)"
  (cd "$ROOT" && .venv/bin/pip install -q -e ".[test,lab]")
fi

if [[ $LAB_SMOKE == 1 ]]; then
  "$HERE/run.sh" -- bash -c 'set -e; ip netns add smoke; ip -n smoke link add d0 type veth peer name d1;
     ip -n smoke link add link d0 name ms0 type macsec cipher gcm-aes-256 encrypt on;
     ip -n smoke xfrm state add src 10.0.0.1 dst 10.0.0.2 proto esp spi 0x100 reqid 1 mode tunnel \
        aead "rfc4106(gcm(aes))" 0x$(printf "11%.0s" {1..36}) 128; ip netns del smoke; echo SMOKE-OK'
fi
log "ready: kernel $KVER"
