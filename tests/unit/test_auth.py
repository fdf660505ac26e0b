"""Device tokens: HMAC-SHA256 against an independent computation, rotation, every refusal."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from omega_common.auth import (
    AuthenticationError,
    FleetKeys,
    bearer,
    token_from_metadata,
)

K1 = b"k" * 32
K2 = bytes(range(40))


def _keys(current: str = "k2", max_age: float | None = None) -> FleetKeys:
    return FleetKeys({"k1": K1, "k2": K2}, current, max_age)


def test_token_mac_matches_an_independent_hmac_sha256() -> None:
    token = _keys().issue("tv-42", issued_at=1_700_000_000)
    version, device_b64, key_id, issued, mac_b64 = token.split(".")
    assert (version, key_id, issued) == ("v1", "k2", "1700000000")
    assert base64.urlsafe_b64decode(device_b64 + "=" * (-len(device_b64) % 4)) == b"tv-42"
    message = b"omega-device-token/v1\x00tv-42\x00k2\x001700000000"
    expected = hmac.new(K2, message, hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(mac_b64 + "=" * (-len(mac_b64) % 4)) == expected


def test_verify_returns_the_credential_and_accepts_every_configured_key() -> None:
    keys = _keys()
    old = keys.issue("tv-1", issued_at=1_000, key_id="k1")  # issued before the rotation
    new = keys.issue("tv-1", issued_at=2_000)
    assert keys.verify(old, now=3_000).key_id == "k1"
    credential = keys.verify(new, now=3_000)
    assert (credential.device_id, credential.key_id, credential.issued_at) == ("tv-1", "k2", 2000)
    retired = FleetKeys({"k2": K2}, "k2")  # k1 removed after re-issuing
    with pytest.raises(AuthenticationError, match="unknown key id"):
        retired.verify(old, now=3_000)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t[:-2] + ("A" if t[-2] != "A" else "B") + t[-1],  # MAC changed
        lambda t: t.replace("v1.", "v2.", 1),
        lambda t: ".".join(t.split(".")[:4]),
        lambda t: t + ".x",
        lambda t: "",
        lambda t: "v1.!!.k2.1.AAAA",
        lambda t: t.replace(".1700000000.", ".1700000001.", 1),  # issued-at changed
        lambda t: t.replace(".k2.", ".k1.", 1),  # key id changed
        lambda t: (
            "v1." + base64.urlsafe_b64encode(b"tv-43").decode().rstrip("=") + t[t.index(".k2") :]
        ),
        lambda t: "x" * 5000,
    ],
)
def test_forged_or_damaged_tokens_are_refused(mutate: object) -> None:
    keys = _keys()
    token = keys.issue("tv-42", issued_at=1_700_000_000)
    with pytest.raises(AuthenticationError):
        keys.verify(mutate(token), now=1_700_000_100)  # type: ignore[operator]


def test_expiry_and_clock_skew() -> None:
    keys = _keys(max_age=3600)
    token = keys.issue("tv-1", issued_at=10_000)
    assert keys.verify(token, now=10_000 + 3600).device_id == "tv-1"
    with pytest.raises(AuthenticationError, match="expired"):
        keys.verify(token, now=10_000 + 3601)
    with pytest.raises(AuthenticationError, match="future"):
        keys.verify(token, now=10_000 - 301)


def test_keys_from_json_and_bad_configurations() -> None:
    text = json.dumps({"a": base64.b64encode(K1).decode(), "b": base64.b64encode(K2).decode()})
    keys = FleetKeys.from_json(text)
    assert keys.key_ids == ("a", "b") and keys.current == "b"
    assert FleetKeys.from_json(text, current="a").current == "a"
    for bad in ("[]", "{", '{"a": 1}', json.dumps({"a": "not base64!"})):
        with pytest.raises(ValueError):
            FleetKeys.from_json(bad)
    with pytest.raises(ValueError, match="32 bytes"):
        FleetKeys({"a": b"short"}, "a")
    with pytest.raises(ValueError, match="key id"):
        FleetKeys({"a b": K1}, "a b")
    with pytest.raises(ValueError, match="current"):
        FleetKeys({"a": K1}, "z")
    with pytest.raises(ValueError):
        _keys().issue("bad\x00id")


def test_bearer_metadata_round_trip_and_refusals() -> None:
    token = _keys().issue("tv-1")
    assert token_from_metadata([("x-other", "1"), *bearer(token)]) == token
    assert token_from_metadata([("Authorization", f"bearer {token}")]) == token
    for metadata in (
        None,
        [],
        [("authorization", token)],
        [("authorization", "Basic abc")],
        [*bearer(token), *bearer(token)],
        [("authorization", b"Bearer x")],
    ):
        with pytest.raises(AuthenticationError):
            token_from_metadata(metadata)  # type: ignore[arg-type]
