"""The MACsec cipher suites the key schedule derives keys for.

Theory of operation: the suite decides which keys :mod:`qkdgate.keymix.schedule`
derives (an XPN suite adds a salt and an SSCI), so it belongs with the key
schedule; :mod:`qkdgate.interfaces` re-exports it for the tunnel parameter
objects. Keeping it here lets keymix sit below the interfaces in the layer
rule (docs/architecture.md, "Layers").
"""

from __future__ import annotations

import enum


class MacsecCipher(enum.Enum):
    """IEEE 802.1AE-2018 14.7 cipher suites (both with a 256-bit SAK)."""

    GCM_AES_256 = "gcm-aes-256"
    GCM_AES_XPN_256 = "gcm-aes-xpn-256"   # 64-bit PN, needs salt + SSCI
