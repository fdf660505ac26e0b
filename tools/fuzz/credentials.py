"""The credential each fuzzed call carries: a seeded mix of none, forged and valid ones.

A server that checks credentials answers most hostile requests UNAUTHENTICATED before it
parses their fields; a fuzzer that only sent those would test the credential check and
nothing behind it. `CredentialMix` therefore sends most cases with a *valid* credential (a
device token for the request's own ``device_id`` on the device listener, the federation
worker's service token on the internal listener) so that they reach validation, and the
rest with every kind of wrong one. Each case's credential depends only on (run seed, case
index), like the case itself, so a replayed or reproduced case carries the same one.

Kinds (``<credential>@<listener>``; the report counts answers per kind), and the answer
expected when the request itself is acceptable:

- ``device@device``: a device token for the request's own ``device_id`` (a fixed id when the
  request names none or does not parse): it reaches validation. When no token can name the
  id (empty, control characters, over 256 bytes) a token of another id goes instead, and the
  answer is PERMISSION_DENIED.
- ``other-device@device``: a valid device token of another device: PERMISSION_DENIED when
  the request names a device, else it reaches validation like ``device@device``.
- ``none@device``: no ``authorization`` metadata: UNAUTHENTICATED.
- ``forged@device``: garbage, a bad MAC, another fleet's secret, an unknown key id, a token
  issued in the future, two tokens, another scheme, an empty, truncated or over-long token:
  UNAUTHENTICATED.
- ``service@device``: the worker's service token on the device listener: PERMISSION_DENIED.
- ``service@internal``: the worker's service token on the internal listener: it reaches
  validation (Federation, FetchEmbeddings, FetchModel), PERMISSION_DENIED elsewhere.
- ``device@internal``: a device token (own id) on the internal listener: PERMISSION_DENIED.
- ``intruder@internal``: a valid token of a service the listener does not accept:
  PERMISSION_DENIED.
- ``none@internal``, ``forged@internal``: as on the device listener: UNAUTHENTICATED.

The sweep (every hostile value of every field once) is sent with the valid credential of its
listener four times in five (`SWEEP_VALID_SHARE`), so that nearly every value reaches the
checks behind the credential; the random cases carry the mix as weighted in `_DEVICE_MIX` and
`_INTERNAL_MIX` (half of them valid).

Health and reflection are open on both listeners (probes carry no credential): their cases
get the same mix and must answer as without one. A method of the device listener that the
internal listener serves too (ConstellationSync: the worker reads catalog pages there) is sent
there with ``service@internal`` / ``device@internal`` (see `tools.fuzz.reflection.Rpc.also`);
the service credential may call only the worker's methods there, the others answer
PERMISSION_DENIED. The warm-up and the fuzzer's own calls (``case`` None or a negative index)
carry a valid credential, health and reflection polls none.
"""

from __future__ import annotations

import base64
import json
import random
import secrets
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Final

from omega_common.auth import METADATA_KEY, FleetKeys, bearer
from omega_common.grpc_auth import OPEN_METHOD_PREFIXES
from tools.fuzz.cases import Case

__all__ = [
    "NO_CREDENTIAL",
    "SWEEP_VALID_SHARE",
    "Credential",
    "CredentialMix",
    "MetadataHook",
    "new_fleet_keys",
]

SWEEP_VALID_SHARE: Final[float] = 0.8
"""Share of the sweep's cases sent with the valid credential of their listener."""

_FIXED_DEVICE: Final[str] = "fuzz-device"
"""The device a token names when the request names none (FetchModel, SearchContent...)."""
_RUNNER_DEVICE: Final[str] = "fuzz-runner"
"""The device of the fuzzer's own calls (the catalog read before the run)."""
_INTRUDER: Final[str] = "service:intruder"
_DEVICE_MIX: Final[tuple[tuple[str, float], ...]] = (  # the valid credential first
    ("device@device", 0.50),
    ("other-device@device", 0.10),
    ("none@device", 0.10),
    ("forged@device", 0.10),
    ("service@device", 0.05),
    ("service@internal", 0.08),  # only when the internal listener serves the method too
    ("device@internal", 0.07),
)
_INTERNAL_MIX: Final[tuple[tuple[str, float], ...]] = (  # the valid credential first
    ("service@internal", 0.50),
    ("device@internal", 0.125),
    ("intruder@internal", 0.125),
    ("none@internal", 0.125),
    ("forged@internal", 0.125),
)
_FORGERIES: Final[tuple[str, ...]] = (
    "garbage",
    "bad-mac",
    "other-fleet",
    "unknown-key",
    "future",
    "two-tokens",
    "basic",
    "empty",
    "too-long",
    "truncated",
)


@dataclass(frozen=True)
class Credential:
    """What one call carries.

    Attributes:
        kind: Its label in the report (``none@device``...; ``plain`` without a mix).
        metadata: The call's metadata (``authorization: Bearer <token>`` or nothing).
        target: The listener to send it to; None: the case's own (``case.rpc.target``).
        expect: The answers a server that checks credentials must give (UNAUTHENTICATED for
            a missing or forged one, PERMISSION_DENIED for the wrong one), apart from the
            refusals that come before the check (a request over the receive limit, bytes
            that do not parse); empty: any answer (a valid credential, an open method).
    """

    kind: str
    metadata: tuple[tuple[str, str], ...] = ()
    target: str | None = None
    expect: frozenset[str] = frozenset()


NO_CREDENTIAL: Final[Credential] = Credential("plain")
"""What every call carries without a hook (servers with credentials off)."""

MetadataHook = Callable[[str, Case | None], Credential]
"""(method path, the case or None for the fuzzer's own calls) -> the call's credential."""


def new_fleet_keys(key_id: str = "k1") -> tuple[FleetKeys, str]:
    """Fresh fleet keys with one random 32-byte secret, and their JSON for the server
    (``OMEGA_CONSTELLATION_FLEET_KEYS``)."""
    text = json.dumps({key_id: base64.b64encode(secrets.token_bytes(32)).decode("ascii")})
    return FleetKeys.from_json(text), text


_UNAUTHENTICATED: Final[frozenset[str]] = frozenset({"UNAUTHENTICATED"})
_DENIED: Final[frozenset[str]] = frozenset({"PERMISSION_DENIED"})


def _device_id(case: Case) -> str | None:
    """The request's ``device_id`` ("" when unset), or None when it has no such field or
    does not parse."""
    try:
        request = case.rpc.request.FromString(case.payload)
    except Exception:  # hostile bytes: whatever the parser raises
        return None
    if "device_id" not in request.DESCRIPTOR.fields_by_name:
        return None
    return str(request.device_id)  # type: ignore[attr-defined]


class CredentialMix:
    """A `MetadataHook` sending cases with the mix of credentials of the module docstring.

    Args:
        keys: The server's fleet keys (tokens are signed with the current one).
        seed: The run's seed (the same as the cases').
        internal_targets: ``host:port`` of the internal listeners; every other target is a
            device listener.
        service: The service name the internal listener accepts (``service:<name>``).
    """

    def __init__(
        self,
        keys: FleetKeys,
        seed: int,
        internal_targets: Collection[str],
        service: str = "federation-worker",
    ) -> None:
        self._keys = keys
        self._seed = seed
        self._internal = frozenset(internal_targets)
        self._issued_at = int(time.time())  # one token per device id for the whole run
        self._service = self._token(f"service:{service}")
        self._intruder = self._token(_INTRUDER)
        other = FleetKeys({keys.current: b"\x5a" * 32}, keys.current)
        self._other_fleet = other.issue(_FIXED_DEVICE, self._issued_at)
        unknown = FleetKeys({"zz-unknown": b"\x5a" * 32}, "zz-unknown")
        self._unknown_key = unknown.issue(_FIXED_DEVICE, self._issued_at)
        self._future = keys.issue(_FIXED_DEVICE, self._issued_at + 3600)

    def _token(self, subject: str) -> str:
        return self._keys.issue(subject, self._issued_at)

    def _device_token(self, case: Case | None, rng: random.Random) -> str:
        """A token for the case's own device id (a fixed one when there is none)."""
        device = _device_id(case) if case is not None else None
        if device is None:
            return self._token(_FIXED_DEVICE)
        try:
            return self._token(device)
        except ValueError:  # no token can name it: any other valid one (PERMISSION_DENIED)
            return self._token(f"fuzz-other-{rng.randrange(1 << 30)}")

    def _forged(self, rng: random.Random) -> tuple[tuple[str, str], ...]:
        how = rng.choice(_FORGERIES)
        valid = self._token(_FIXED_DEVICE)
        if how == "garbage":
            alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
            return bearer("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200))))
        if how == "bad-mac":
            head, _, mac = valid.rpartition(".")
            flipped = "A" if mac[0] != "A" else "B"
            return bearer(f"{head}.{flipped}{mac[1:]}")
        if how == "other-fleet":
            return bearer(self._other_fleet)
        if how == "unknown-key":
            return bearer(self._unknown_key)
        if how == "future":
            return bearer(self._future)
        if how == "two-tokens":
            return (*bearer(valid), *bearer(valid))
        if how == "basic":
            return ((METADATA_KEY, "Basic ZnV6ejpmdXp6"),)
        if how == "empty":
            return ((METADATA_KEY, "Bearer "),)
        if how == "too-long":
            return bearer(valid + "A" * 2048)
        return bearer(valid[: rng.randrange(1, len(valid))])

    def __call__(self, path: str, case: Case | None) -> Credential:
        """The credential of one call (a `MetadataHook`)."""
        if case is None or case.index < 0:
            if path.startswith(OPEN_METHOD_PREFIXES):
                return Credential("fuzzer")  # probes carry no credential
            target = case.rpc.target if case is not None else None
            if target in self._internal:
                return Credential("fuzzer", bearer(self._service))
            return Credential("fuzzer", bearer(self._token(_RUNNER_DEVICE)))
        rng = random.Random(f"{self._seed}/{case.index}/credential")
        internal = case.rpc.target in self._internal
        also = [t for t in case.rpc.also if t in self._internal]
        mix = _INTERNAL_MIX if internal else _DEVICE_MIX
        if not internal and not also:
            mix = tuple((k, w) for k, w in mix if not k.endswith("@internal"))
        kind = rng.choices([k for k, _ in mix], weights=[w for _, w in mix])[0]
        if case.kind == "sweep" and rng.random() < SWEEP_VALID_SHARE:
            kind = mix[0][0]  # the valid credential of the listener
        target = None if internal or not kind.endswith("@internal") else rng.choice(also)
        metadata: Sequence[tuple[str, str]]
        expect = frozenset[str]()
        credential = kind.split("@")[0]
        if credential == "device":
            metadata = bearer(self._device_token(case, rng))
            expect = _DENIED if kind == "device@internal" else expect
        elif credential == "other-device":
            metadata = bearer(self._token(f"fuzz-other-{rng.randrange(1 << 30)}"))
            expect = _DENIED if _device_id(case) is not None else expect
        elif credential == "service":
            metadata = bearer(self._service)
            expect = _DENIED if kind == "service@device" else expect
        elif credential == "intruder":
            metadata, expect = bearer(self._intruder), _DENIED
        elif credential == "forged":
            metadata, expect = self._forged(rng), _UNAUTHENTICATED
        else:
            metadata, expect = (), _UNAUTHENTICATED
        if path.startswith(OPEN_METHOD_PREFIXES):
            expect = frozenset()  # health and reflection take any caller
        return Credential(kind, tuple(metadata), target, expect)
