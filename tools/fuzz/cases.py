"""Hostile requests, generated deterministically from a seed and a case index.

Case ``i`` of a run depends only on (run seed, ``i``, the server's RPC list), so any failing
case can be rebuilt alone (``python -m tools.fuzz --case i``). A run first *sweeps*: every
field of every RPC's seed request (nested payloads included) gets each hostile value of its
type in turn, the most hostile value of every field first; the remaining cases are random:

- ``mutate``: 1 to 4 fields of the seed set to hostile or plausible values;
- ``scratch``: a message built from the descriptor alone, every field random;
- ``random-bytes``: bytes that are mostly not protobuf at all;
- ``bitflip``: the seed's bytes with bits flipped, truncated or spliced;
- ``bytes-garbage``: every ``bytes`` field (nested ones too) replaced by garbage or zstd bombs;
- ``huge-repeated``: a repeated field with 10,000 elements;
- ``oversize``: a request above the receive limit of the listener that serves the method
  (the device listener's 1 MiB, the internal listener's 64 MiB).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from omega.v1 import sync_pb2
from omega_protocol import PayloadError, decode_payload, encode_payload
from tools.fuzz.reflection import Rpc
from tools.fuzz.seeds import LINKED_FIELDS, NESTED_PAYLOADS, SeedBuilder
from tools.fuzz.values import (
    HUGE_REPEATED,
    benign_value,
    garbage_bytes,
    hostile_values,
    random_value,
)

__all__ = ["Case", "CasePlan", "Slot", "slots_of"]

_INNER_MAX_BYTES: Final[int] = 64 << 20
"""Largest nested payload the fuzzer itself decodes (its own seeds are tiny)."""
_HUGE_BYTES: Final[int] = 4 << 20
"""A huge repeated field of messages stops at about this many bytes (10,000 elements at most)."""
_MESSAGE_OPS: Final[tuple[str, ...]] = ("clear", "empty", "random")
_REPEATED_OPS: Final[tuple[str, ...]] = ("huge", "empty", "duplicate")
_RANDOM_KINDS: Final[tuple[tuple[str, float], ...]] = (
    ("mutate", 0.40),
    ("scratch", 0.12),
    ("random-bytes", 0.12),
    ("bitflip", 0.12),
    ("bytes-garbage", 0.12),
    ("huge-repeated", 0.08),
    ("oversize", 0.04),
)


@dataclass(frozen=True)
class Case:
    """One request to send.

    Attributes:
        index: Position in the run (rebuild it alone with the same seed).
        rpc: The method it goes to.
        kind: How it was made (see the module docstring; ``sweep`` for the sweep).
        note: What was changed, for the report.
        payload: The serialized request, sent as is.
    """

    index: int
    rpc: Rpc
    kind: str
    note: str
    payload: bytes


@dataclass(frozen=True)
class Slot:
    """A place in a request where a value can go.

    Attributes:
        path: ``a.b[0].c``; ``/`` enters a nested payload (``delta/added[0].pattern_id``).
        field: The field's descriptor.
        whole: For a repeated field: the whole list (else the element the path names).
    """

    path: str
    field: FieldDescriptor
    whole: bool = False

    def options(self) -> int:
        """How many sweep values this slot has."""
        if self.whole:
            return len(_REPEATED_OPS)
        if self.field.type == FieldDescriptor.TYPE_MESSAGE:
            return len(_MESSAGE_OPS)
        return len(hostile_values(self.field))


def _is_repeated(f: FieldDescriptor) -> bool:
    return bool(f.is_repeated)


def slots_of(message: Message, inner: dict[str, Message], prefix: str = "") -> list[Slot]:
    """Every slot of ``message`` as set in it (message fields are entered when set, repeated
    ones at their first element), nested payloads included (see `seeds.NESTED_PAYLOADS`).

    Args:
        message: A seed request (or a message inside it).
        inner: Decoded nested payloads by path (see `Expanded`).
        prefix: Path of ``message`` itself.
    """
    found: list[Slot] = []
    descriptor: Any = message.DESCRIPTOR
    for f in descriptor.fields:
        path = f"{prefix}{f.name}"
        if _is_repeated(f):
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                continue  # no map fields in these protocols
            found.append(Slot(path, f, whole=True))
            values = getattr(message, f.name)
            if len(values):
                if f.type == FieldDescriptor.TYPE_MESSAGE:
                    found += slots_of(values[0], inner, f"{path}[0].")
                else:
                    found.append(Slot(f"{path}[0]", f))
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            found.append(Slot(path, f))
            if message.HasField(f.name):
                found += slots_of(getattr(message, f.name), inner, f"{path}.")
                if path in inner:
                    found += slots_of(inner[path], inner, f"{path}/")
        else:
            found.append(Slot(path, f))
    return found


@dataclass
class Expanded:
    """A request with its nested payloads decoded, mutated, then serialized again.

    Changes to a payload's envelope (its ``CompressedPayload`` fields: codec, sizes, data)
    are deferred until the payload has been encoded again, so that they survive it.

    Attributes:
        outer: The request.
        inner: Decoded nested payloads by the path of their ``CompressedPayload`` field.
        compress: Per payload path, re-encode with zstd (else CODEC_NONE).
        deferred: Envelope changes, applied by `serialize` after the payloads are encoded.
    """

    outer: Message
    inner: dict[str, Message] = field(default_factory=dict)
    compress: dict[str, bool] = field(default_factory=dict)
    deferred: list[Callable[[], None]] = field(default_factory=list)

    def apply(self, path: str, change: Callable[[], None]) -> None:
        """Run ``change`` (which writes at ``path``) now, or after encoding for an envelope."""
        if any(path == p or path.startswith(f"{p}.") for p in self.inner):
            self.deferred.append(change)
        else:
            change()

    @classmethod
    def of(cls, outer: Message, classes: Callable[[str], type[Message]]) -> Expanded:
        """Decode the nested payloads of ``outer`` (only at the top level, where they are)."""
        expanded = cls(outer)
        name = outer.DESCRIPTOR.full_name
        for (owner, field_name), inner_type in NESTED_PAYLOADS.items():
            if owner != name or not outer.HasField(field_name):
                continue
            envelope = sync_pb2.CompressedPayload.FromString(
                getattr(outer, field_name).SerializeToString()
            )
            try:
                expanded.inner[field_name] = decode_payload(
                    envelope, classes(inner_type), max_raw_bytes=_INNER_MAX_BYTES
                )
            except PayloadError:
                continue
            expanded.compress[field_name] = envelope.codec == sync_pb2.CODEC_ZSTD
        return expanded

    def container(self, path: str) -> tuple[Message, str, int | None]:
        """(message holding the last step, field name, element index or None) of ``path``."""
        if "/" in path:
            head, rest = path.split("/", 1)
            node: Message = self.inner[head]
        else:
            node, rest = self.outer, path
        steps = rest.split(".")
        for step in steps[:-1]:
            name, index = _step(step)
            child = getattr(node, name)
            if index is not None:
                while len(child) <= index:
                    child.add()
                node = child[index]
            else:
                node = child
        name, index = _step(steps[-1])
        return node, name, index

    def serialize(self) -> bytes:
        """The request with its (possibly mutated) payloads encoded again."""
        for path, inner in self.inner.items():
            encoded = encode_payload(inner, compress=self.compress.get(path, True))
            envelope = getattr(self.outer, path)
            envelope.Clear()
            envelope.MergeFromString(encoded.SerializeToString())
        for change in self.deferred:
            change()
        return bytes(self.outer.SerializeToString())


def _step(step: str) -> tuple[str, int | None]:
    if step.endswith("]"):
        name, index = step[:-1].split("[")
        return name, int(index)
    return step, None


def random_message(
    message: Message, rng: random.Random, depth: int = 0, hostility: float = 0.5
) -> None:
    """Fill ``message`` in place with random fields (hostile with probability ``hostility``)."""
    descriptor: Any = message.DESCRIPTOR
    for f in descriptor.fields:
        if rng.random() < 0.4:
            continue
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 4:
                continue
            if _is_repeated(f):
                for _ in range(rng.choice([0, 1, 2, 3, 50])):
                    random_message(getattr(message, f.name).add(), rng, depth + 1, hostility)
            else:
                random_message(getattr(message, f.name), rng, depth + 1, hostility)
                getattr(message, f.name).SetInParent()
        elif _is_repeated(f):
            count = rng.choice([0, 1, 2, 5, 100])
            level = hostility if count < 100 else 0.0  # 100 hostile strings could be 10 MB
            getattr(message, f.name).extend(random_value(f, rng, level) for _ in range(count))
        else:
            setattr(message, f.name, random_value(f, rng, hostility))


def _set(expanded: Expanded, slot: Slot, option: int, rng: random.Random) -> str:
    """Apply sweep value number ``option`` of ``slot``; returns a description."""
    f = slot.field
    if slot.whole:
        op = _REPEATED_OPS[option % len(_REPEATED_OPS)]
        filler = benign_value(f, rng) if f.type != FieldDescriptor.TYPE_MESSAGE else None

        def repeat() -> None:
            node, name, _ = expanded.container(slot.path)
            values = getattr(node, name)
            count = 0 if op == "empty" else HUGE_REPEATED if op == "huge" else 2
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                template = None
                if len(values):
                    template = type(values[0])()
                    template.CopyFrom(values[0])
                    count = min(count, max(2, _HUGE_BYTES // max(1, template.ByteSize())))
                del values[:]
                for _ in range(count):
                    added = values.add()
                    if template is not None:
                        added.CopyFrom(template)
            else:
                value = values[0] if len(values) else filler
                size = len(value) if isinstance(value, str | bytes) else 8
                count = min(count, max(2, _HUGE_BYTES // max(1, size)))
                del values[:]
                values.extend([value] * count)

        expanded.apply(slot.path, repeat)
        return f"{slot.path}: {op}"
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        op = _MESSAGE_OPS[option % len(_MESSAGE_OPS)]
        filled = rng.getrandbits(32)

        def change() -> None:
            node, name, index = expanded.container(slot.path)
            if op == "clear" and index is None:
                node.ClearField(name)
                return
            target = getattr(node, name) if index is None else getattr(node, name)[index]
            target.Clear()
            if op == "random":
                random_message(target, random.Random(filled))
            target.SetInParent()

        expanded.apply(slot.path, change)
        return f"{slot.path}: {op}"
    value = hostile_values(f)[option]
    _write(expanded, slot.path, value)
    return f"{slot.path} = {_show(value)}"


def _write(expanded: Expanded, path: str, value: Any) -> None:
    """Set the scalar at ``path`` (deferred for a payload envelope)."""

    def change() -> None:
        node, name, index = expanded.container(path)
        _assign(node, name, index, value)

    expanded.apply(path, change)


def _assign(node: Message, name: str, index: int | None, value: Any) -> None:
    if index is None:
        setattr(node, name, value)
    else:
        values = getattr(node, name)
        while len(values) <= index:
            values.append(value)
        values[index] = value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 48 else f"{text[:40]}...({len(text)} chars)"


def _linked(rpc: Rpc, path: str) -> list[str]:
    """The slots a valid request keeps equal to ``path``."""
    partners: list[str] = []
    for a, b in LINKED_FIELDS.get(rpc.request_descriptor.full_name, []):
        if path == a:
            partners.append(b)
        elif path == b:
            partners.append(a)
    return partners


class CasePlan:
    """The cases of one run: the sweep, then random cases, spread over the RPCs.

    Args:
        rpcs: Methods to fuzz (from reflection).
        seeds: Seed builders by method path (see `tools.fuzz.seeds`).
        classes: Message class by full name (the reflection pool), for nested payloads.
        seed: The run's seed.
        max_request_bytes: The server's receive limit; oversize cases exceed it.
        limits: Receive limits of listeners whose limit differs (``host:port`` -> bytes):
            the oversize cases of their methods exceed those instead.
    """

    def __init__(
        self,
        rpcs: Sequence[Rpc],
        seeds: dict[str, SeedBuilder],
        classes: Callable[[str], type[Message]],
        seed: int,
        max_request_bytes: int,
        limits: Mapping[str, int] | None = None,
    ) -> None:
        self.rpcs = list(rpcs)
        self._limits = dict(limits or {})
        self._seeds = seeds
        self._classes = classes
        self._seed = seed
        self._max_request_bytes = max_request_bytes
        self.slots = [slots_of(e.outer, e.inner) for e in map(self._expanded_seed, self.rpcs)]
        self.sweep: list[tuple[int, int, int]] = []  # (rpc, slot, option)
        rounds = max((s.options() for slots in self.slots for s in slots), default=0)
        for option in range(rounds):
            for r, slots in enumerate(self.slots):
                self.sweep += [(r, i, option) for i, s in enumerate(slots) if option < s.options()]
        self._weights = [1.0 + len(s) / 10.0 for s in self.slots]

    def _rng(self, index: int, salt: str = "") -> random.Random:
        return random.Random(f"{self._seed}/{index}/{salt}")

    def seed_bytes(self, rpc: Rpc, index: int) -> bytes:
        """The seed request of ``rpc`` for case ``index`` (empty message without a seed)."""
        builder = self._seeds.get(rpc.path)
        if builder is None:
            return b""
        return builder(self._rng(index, "seed"), index)

    def _expanded_seed(self, rpc: Rpc, index: int = 0) -> Expanded:
        return Expanded.of(rpc.request.FromString(self.seed_bytes(rpc, index)), self._classes)

    def case(self, index: int) -> Case:
        """Case number ``index`` of the run."""
        if index < len(self.sweep):
            r, s, option = self.sweep[index]
            return self._sweep_case(index, self.rpcs[r], self.slots[r][s], option)
        rng = self._rng(index)
        rpc = rng.choices(self.rpcs, weights=self._weights)[0]
        kind = rng.choices([k for k, _ in _RANDOM_KINDS], weights=[w for _, w in _RANDOM_KINDS])[0]
        make = {
            "mutate": self._mutate,
            "scratch": self._scratch,
            "random-bytes": self._random_bytes,
            "bitflip": self._bitflip,
            "bytes-garbage": self._bytes_garbage,
            "huge-repeated": self._huge_repeated,
            "oversize": self._oversize,
        }[kind]
        note, payload = make(rpc, index, rng)
        return Case(index, rpc, kind, note, payload)

    def _sweep_case(self, index: int, rpc: Rpc, slot: Slot, option: int) -> Case:
        rng = self._rng(index)
        expanded = self._expanded_seed(rpc, index)
        note = _set(expanded, slot, option, rng)
        scalar = not slot.whole and slot.field.type != FieldDescriptor.TYPE_MESSAGE
        for partner in _linked(rpc, slot.path) if scalar else []:
            _write(expanded, partner, hostile_values(slot.field)[option])
            note += f" (and {partner})"
        return Case(index, rpc, "sweep", note, expanded.serialize())

    def _mutate(self, rpc: Rpc, index: int, rng: random.Random) -> tuple[str, bytes]:
        expanded = self._expanded_seed(rpc, index)
        slots = slots_of(expanded.outer, expanded.inner)
        if not slots:
            return self._scratch(rpc, index, rng)
        notes = []
        for slot in rng.sample(slots, min(len(slots), rng.randint(1, 4))):
            try:
                expanded.container(slot.path)
            except (KeyError, IndexError, AttributeError):
                continue  # an earlier mutation removed the message this slot was in
            if slot.whole or slot.field.type == FieldDescriptor.TYPE_MESSAGE:
                notes.append(_set(expanded, slot, rng.randrange(slot.options()), rng))
                continue
            value = random_value(slot.field, rng, hostility=0.8)
            _write(expanded, slot.path, value)
            notes.append(f"{slot.path} = {_show(value)}")
            if rng.random() < 0.7:
                for partner in _linked(rpc, slot.path):
                    _write(expanded, partner, value)
        return "; ".join(notes), expanded.serialize()

    def _scratch(self, rpc: Rpc, index: int, rng: random.Random) -> tuple[str, bytes]:
        message = rpc.request()
        random_message(message, rng, hostility=rng.choice([0.2, 0.5, 0.9]))
        return "from the descriptor", bytes(message.SerializeToString())

    def _random_bytes(self, rpc: Rpc, index: int, rng: random.Random) -> tuple[str, bytes]:
        raw = garbage_bytes(rng)
        if rng.random() < 0.3 and raw:
            raw = bytes([rng.choice([0x0A, 0x12, 0x08, 0x22, 0x1A])]) + raw  # a plausible tag
        return f"{len(raw)} random bytes", raw

    def _bitflip(self, rpc: Rpc, index: int, rng: random.Random) -> tuple[str, bytes]:
        raw = bytearray(self.seed_bytes(rpc, index))
        if not raw:
            return self._random_bytes(rpc, index, rng)
        how = rng.choice(["flip", "truncate", "splice", "repeat"])
        if how == "flip":
            for _ in range(rng.randint(1, 8)):
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        elif how == "truncate":
            raw = raw[: rng.randrange(len(raw))]
        elif how == "splice":
            at = rng.randrange(len(raw))
            raw[at:at] = rng.randbytes(rng.randint(1, 32))
        else:
            at = rng.randrange(len(raw))
            raw += raw[at:]
        return f"seed bytes: {how}", bytes(raw)

    def _bytes_garbage(self, rpc: Rpc, index: int, rng: random.Random) -> tuple[str, bytes]:
        expanded = self._expanded_seed(rpc, index)
        slots = [
            s
            for s in slots_of(expanded.outer, expanded.inner)
            if s.field.type == FieldDescriptor.TYPE_BYTES and not s.whole
        ]
        if not slots:
            return self._mutate(rpc, index, rng)
        chosen = [s for s in slots if rng.random() < 0.5] or [rng.choice(slots)]
        notes = [_set(expanded, s, rng.randrange(s.options()), rng) for s in chosen]
        return "; ".join(notes), expanded.serialize()

    def _huge_repeated(self, rpc: Rpc, index: int, rng: random.Random) -> tuple[str, bytes]:
        expanded = self._expanded_seed(rpc, index)
        slots = [s for s in slots_of(expanded.outer, expanded.inner) if s.whole]
        if not slots:
            return self._oversize(rpc, index, rng)
        slot = rng.choice(slots)
        return _set(expanded, slot, 0, rng), expanded.serialize()

    def _oversize(self, rpc: Rpc, index: int, rng: random.Random) -> tuple[str, bytes]:
        limit = self._limits.get(rpc.target, self._max_request_bytes)
        size = limit + rng.randint(1, 3 << 20)
        body = b"\x00" * size
        length = size
        varint = bytearray()
        while True:
            byte = length & 0x7F
            length >>= 7
            varint.append(byte | (0x80 if length else 0))
            if not length:
                break
        return f"{size} bytes", b"\x0a" + bytes(varint) + body
