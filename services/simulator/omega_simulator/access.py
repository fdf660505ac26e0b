"""How simulated devices reach the shards: TLS trust and one credential per device.

The simulator plays the fleet's manufacturer: it holds the fleet keys and issues every
simulated device its own token, as the factory would (`omega_common.auth`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omega_brain import GrpcTransport
from omega_common.auth import FleetKeys

__all__ = ["FleetAccess"]


@dataclass(frozen=True)
class FleetAccess:
    """TLS trust and credentials of the simulated fleet.

    Attributes:
        plaintext: no TLS (shards started with ``OMEGA_CONSTELLATION_PLAINTEXT=true``).
        root_certificates: PEM CA bundle of the shards' certificates (None: system roots).
        keys: fleet keys to issue device tokens with; None sends no credential.
    """

    plaintext: bool = False
    root_certificates: bytes | None = None
    keys: FleetKeys | None = None

    @classmethod
    def of(cls, plaintext: bool, ca_file: Path | None, keys_file: Path | None) -> FleetAccess:
        """From files (the CA certificate and the fleet keys JSON).

        Raises:
            OSError: a file cannot be read; ValueError: malformed keys.
        """
        return cls(
            plaintext,
            None if ca_file is None else ca_file.read_bytes(),
            None if keys_file is None else FleetKeys.from_file(keys_file),
        )

    def transport(self, address: str) -> GrpcTransport:
        """A channel to ``address`` without a credential (share it with `credential`)."""
        return GrpcTransport(
            address, root_certificates=self.root_certificates, plaintext=self.plaintext
        )

    def credential(self, device_id: str) -> str | None:
        """The device's token, or None without fleet keys."""
        return None if self.keys is None else self.keys.issue(device_id)
