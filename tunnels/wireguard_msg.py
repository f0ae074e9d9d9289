"""WireGuard generic-netlink declarations (include/uapi/linux/wireguard.h).

Theory of operation: names are copied verbatim from the header so they grep.
Requests are packed by :mod:`qkdgate.tunnels.wireguard` with
:func:`~qkdgate.tunnels.netlink.nla`; ``wg_genlmsg`` in
:mod:`qkdgate.tunnels.netlink_decode` declares the same tree in pyroute2's
style for decoding dumps. The header's notes
that matter here:

* ``WG_CMD_GET_DEVICE`` must be a dump (``NLM_F_DUMP``) naming the device by
  ``WGDEVICE_A_IFINDEX`` or ``WGDEVICE_A_IFNAME``; a device with many peers
  spans several messages, each repeating the device attributes.
* ``WGDEVICE_A_PEERS`` and ``WGPEER_A_ALLOWEDIPS`` are nested arrays: each
  element is a nested attribute whose type is its index (ignored).
* In ``WG_CMD_SET_DEVICE`` peers are applied in order; ``WGPEER_F_REMOVE_ME``
  removes a peer, ``WGPEER_F_REPLACE_ALLOWEDIPS`` replaces (instead of adding
  to) its allowed IPs, ``WGPEER_F_UPDATE_ONLY`` never creates a peer.
* A preshared key of all zeros means "no preshared key".
"""

from __future__ import annotations

WG_GENL_NAME = "wireguard"
WG_GENL_VERSION = 1
WG_KEY_LEN = 32

# enum wg_cmd
WG_CMD_GET_DEVICE, WG_CMD_SET_DEVICE = 0, 1
# enum wgdevice_flag
WGDEVICE_F_REPLACE_PEERS = 1 << 0
# enum wgdevice_attribute
(WGDEVICE_A_UNSPEC, WGDEVICE_A_IFINDEX, WGDEVICE_A_IFNAME, WGDEVICE_A_PRIVATE_KEY,
 WGDEVICE_A_PUBLIC_KEY, WGDEVICE_A_FLAGS, WGDEVICE_A_LISTEN_PORT, WGDEVICE_A_FWMARK,
 WGDEVICE_A_PEERS) = range(9)
# enum wgpeer_flag
WGPEER_F_REMOVE_ME, WGPEER_F_REPLACE_ALLOWEDIPS, WGPEER_F_UPDATE_ONLY = 1 << 0, 1 << 1, 1 << 2
# enum wgpeer_attribute
(WGPEER_A_UNSPEC, WGPEER_A_PUBLIC_KEY, WGPEER_A_PRESHARED_KEY, WGPEER_A_FLAGS,
 WGPEER_A_ENDPOINT, WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, WGPEER_A_LAST_HANDSHAKE_TIME,
 WGPEER_A_RX_BYTES, WGPEER_A_TX_BYTES, WGPEER_A_ALLOWEDIPS,
 WGPEER_A_PROTOCOL_VERSION) = range(11)
# enum wgallowedip_attribute
WGALLOWEDIP_A_UNSPEC, WGALLOWEDIP_A_FAMILY, WGALLOWEDIP_A_IPADDR, WGALLOWEDIP_A_CIDR_MASK = range(4)
