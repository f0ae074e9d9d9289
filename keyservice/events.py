"""What the key service reports: every key served or fetched, every refusal.

Fields are safe to print: names, generation numbers, indices, key_IDs (public
identifiers) and the generation's inputs, never key bytes (docs/keyservice.md 6).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where a served key came from: the generation and its inputs."""

    peer: str
    generation: int
    role: str                       # our handshake role in that generation
    kem: str
    x25519: bool
    qkd_key_ids: tuple[str, ...]

    @property
    def inputs(self) -> str:
        return self.kem + ("+X25519" if self.x25519 else "") + ("+QKD" if self.qkd_key_ids else "")

    def as_dict(self) -> dict[str, object]:
        return {"peer": self.peer, "generation": self.generation, "inputs": self.inputs,
                "qkd_key_ids": list(self.qkd_key_ids)}


@dataclass(frozen=True, slots=True)
class KeysDelivered:
    """Keys handed to an SAE: ``api`` is ``"enc_keys"``/``"dec_keys"`` (ETSI
    GS QKD 014) or ``"skip_new_key"``/``"skip_key_by_id"``."""

    pool: str
    api: str
    master_sae: str
    slave_sae: str
    key_ids: tuple[str, ...]
    indices: tuple[int, ...]
    provenance: Provenance


@dataclass(frozen=True, slots=True)
class KeysRefused:
    pool: str | None
    api: str
    caller: str | None
    status: int
    reason: str


ServiceEvent = KeysDelivered | KeysRefused
