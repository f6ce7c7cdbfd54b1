"""Internal ZMQ messages between ingest, bookd and the bus (DESIGN.md section 3).

One message per ZMQ frame (no multipart on the hot path). Every message starts with a
fixed 32-byte little-endian header:

    offset size field
    0      1    kind        FRAME (a raw Kraken book frame follows), CONTROL (a msgpack
                            control Struct follows), EVENT (a bus event follows) or
                            BATCH (several of the others follow, see below)
    1      1    version     HEADER_VERSION; a receiver drops and counts other versions
    2      2    pair_index  index of the pair in `[trading] pairs`, NO_PAIR if none
    4      4    count       BATCH: number of messages inside; 0 otherwise
    8      8    conn_id     ingest's connection id (unique across ingest restarts)
    16     8    seq         per (conn_id, pair) sequence number, from 1, for FRAME;
                            0 otherwise
    24     8    recv_ns     unix ns when ingest received the frame (0 if not a frame)

FRAME payloads are the WebSocket text frame exactly as received: never re-serialized.
CONTROL payloads are one of the `Control` Structs in msgpack (tagged union on `kind`).
EVENT payloads are `topic SP type SP json`, the event as the bus wraps it into its
envelope (see bus/schema.py); producers never stamp bus sequence numbers.
BATCH payloads are `count` records `[u32 length][one complete message of another
kind]`, in order: batching on the internal hops amortizes the per-message cost of ZMQ
(a few us in Python) over many frames; a receiver handles each inner message exactly as
if it had come alone. Senders batch only what they have at hand (ingest: the frames of
one socket read; bookd: the events of one drain pass, sent in growing pieces, see
bookd.service._Out), so batching adds no waiting. Receivers' hot loops use
`unpack_inner` (every inner message's header fields and payload in one pass).

Pure module: no sockets, no clock.
"""

from __future__ import annotations

import struct

import msgspec

HEADER = struct.Struct("<BBHIQQQ")
HEADER_SIZE = HEADER.size  # 32
HEADER_VERSION = 1
NO_PAIR = 0xFFFF

FRAME = 1
CONTROL = 2
EVENT = 3
BATCH = 4
KINDS = (FRAME, CONTROL, EVENT, BATCH)
_LEN = struct.Struct("<I")
_pack_len = _LEN.pack
BATCH_LIMIT = 128  # messages per batch at most


def batch_hwm(messages: int, batch: int = BATCH_LIMIT) -> int:
    """A ZMQ high-water mark (which counts ZMQ messages, i.e. batches) that bounds a
    queue of batches of up to `batch` messages to about `messages` messages."""
    return max(16, messages // batch)


class MessageError(ValueError):
    """A malformed internal message (short, unknown kind or version, bad payload)."""


class PairInfo(msgspec.Struct, frozen=True, tag="pair_info", tag_field="kind"):
    """Sent by ingest before the first book frame of a connection, once per pair."""

    conn_id: int
    pair: str
    pair_index: int
    depth: int
    price_precision: int
    qty_precision: int
    status: str = "online"
    price_increment: str = ""
    qty_increment: str = ""


class Stale(msgspec.Struct, frozen=True, tag="stale", tag_field="kind"):
    """A pair's book subscription went silent (or its snapshot never came)."""

    conn_id: int
    pair: str
    reason: str
    silent_ns: int = 0


class ResyncRequest(msgspec.Struct, frozen=True, tag="resync", tag_field="kind"):
    """bookd -> ingest: send fresh snapshots of these pairs (unsubscribe, subscribe)."""

    pairs: tuple[str, ...]
    reason: str
    conn_id: int = 0  # the connection whose book was bad; 0 = whatever is current


class ConnectionState(msgspec.Struct, frozen=True, tag="conn", tag_field="kind"):
    """ingest -> bookd: a connection went up or down (bookd drops that conn's books)."""

    conn_id: int
    up: bool
    reason: str = ""


Control = PairInfo | Stale | ResyncRequest | ConnectionState

_enc = msgspec.msgpack.Encoder()
_control_dec = msgspec.msgpack.Decoder(Control)
_pack = HEADER.pack
_unpack_from = HEADER.unpack_from


def pack_frame(frame: bytes, conn_id: int, pair_index: int, seq: int, recv_ns: int) -> bytes:
    """Header + raw book frame, as one ZMQ message."""
    return _pack(FRAME, HEADER_VERSION, pair_index, 0, conn_id, seq, recv_ns) + frame


def pack_control(msg: Control, conn_id: int = 0, pair_index: int = NO_PAIR) -> bytes:
    return _pack(CONTROL, HEADER_VERSION, pair_index, 0, conn_id, 0, 0) + _enc.encode(msg)


def pack_event(topic: str, type_name: str, event_json: bytes, recv_ns: int = 0) -> bytes:
    """A bus event from a producer: the bus adds the envelope (epoch, seq, pub_ns)."""
    return event_prefix(topic, type_name, recv_ns) + event_json


def event_prefix(topic: str, type_name: str, recv_ns: int = 0) -> bytes:
    """The bytes of `pack_event(topic, type_name, json, recv_ns)` before the JSON."""
    if " " in topic or " " in type_name:
        raise MessageError("topic and type must not contain spaces")
    return (_pack(EVENT, HEADER_VERSION, NO_PAIR, 0, 0, 0, recv_ns)
            + topic.encode() + b" " + type_name.encode() + b" ")


def unpack_header(msg: bytes) -> tuple[int, int, int, int, int]:
    """(kind, pair_index, conn_id, seq, recv_ns); raises MessageError."""
    if len(msg) < HEADER_SIZE:
        raise MessageError(f"message of {len(msg)} bytes is shorter than the header")
    kind, version, pair_index, _, conn_id, seq, recv_ns = _unpack_from(msg)
    if version != HEADER_VERSION:
        raise MessageError(f"header version {version}, expected {HEADER_VERSION}")
    if kind not in KINDS:
        raise MessageError(f"unknown message kind {kind}")
    return kind, pair_index, conn_id, seq, recv_ns


def decode_control(msg: bytes) -> Control:
    return decode_control_payload(memoryview(msg)[HEADER_SIZE:])


def decode_control_payload(payload: bytes | memoryview) -> Control:
    """A CONTROL message's Struct from its payload (the bytes after the header)."""
    try:
        return _control_dec.decode(payload)
    except msgspec.DecodeError as e:
        raise MessageError(f"bad control message: {e}") from None


def split_event(msg: bytes) -> tuple[str, str, bytes]:
    """(topic, type, event_json) of an EVENT message."""
    body = msg[HEADER_SIZE:]
    a = body.find(b" ")
    b = body.find(b" ", a + 1)
    if a <= 0 or b <= a + 1:
        raise MessageError("event message without topic and type")
    return body[:a].decode(), body[a + 1:b].decode(), body[b + 1:]


def pack_batch(messages: list[bytes]) -> bytes:
    """One ZMQ message carrying `messages` (each a complete FRAME/CONTROL/EVENT message)."""
    parts = [_pack(BATCH, HEADER_VERSION, NO_PAIR, len(messages), 0, 0, 0)]
    pack_len = _LEN.pack
    for m in messages:
        parts.append(pack_len(len(m)))
        parts.append(m)
    return b"".join(parts)


def _batch_spans(msg: bytes) -> list[tuple[int, int]]:
    """(start, end) of each message inside the BATCH `msg`, checked against its framing
    (count, lengths, no stray bytes); raises MessageError if malformed."""
    if len(msg) < HEADER_SIZE:
        raise MessageError("not a batch message")
    count = _unpack_from(msg)[3]
    spans = []
    off = HEADER_SIZE
    end = len(msg)
    unpack_len = _LEN.unpack_from
    for _ in range(count):
        if off + 4 > end:
            raise MessageError(f"batch cut short after {len(spans)} of {count} messages")
        (n,) = unpack_len(msg, off)
        start = off + 4
        off = start + n
        if off > end:
            raise MessageError(f"batch cut short after {len(spans)} of {count} messages")
        spans.append((start, off))
    if off != end:
        raise MessageError(f"{end - off} stray bytes after {count} batched messages")
    return spans


def unpack_batch(msg: bytes) -> list[bytes]:
    """The messages inside a BATCH message, in order; raises MessageError if malformed."""
    if msg[:1] != _BATCH_KIND:
        raise MessageError("not a batch message")
    return [msg[start:end] for start, end in _batch_spans(msg)]


_BATCH_KIND = bytes([BATCH])


def inner_messages(msg: bytes) -> list[bytes] | tuple[bytes]:
    """What one received ZMQ message carries: a BATCH's messages, else the message itself.

    Every receiver goes through this, so a batched and an unbatched sender look the same.
    Raises MessageError for a malformed batch (nothing of it is returned).
    """
    return unpack_batch(msg) if msg[:1] == _BATCH_KIND else (msg,)


BAD = 0  # unpack_inner's kind for an inner message whose header is bad


def unpack_inner(msg: bytes) -> list[tuple[int, int, int, int, int, bytes | str]]:
    """`inner_messages` and `unpack_header` in one pass, for receivers' hot loops.

    One `(kind, pair_index, conn_id, seq, recv_ns, payload)` per inner message, in
    order, `payload` being the bytes after its header (sliced once, straight from the
    batch). An inner message with a bad header comes as `(BAD, 0, 0, 0, 0, reason)`:
    the receiver counts and skips it, as `unpack_header` raising MessageError would
    have it do. A malformed batch raises MessageError (nothing of it is returned).
    """
    if msg[:1] != _BATCH_KIND:
        return [_record(msg, 0, len(msg))]
    out = []
    unpack = _unpack_from
    for start, end in _batch_spans(msg):
        if end - start >= HEADER_SIZE:  # _record, inlined for good messages
            kind, version, pair_index, _, conn_id, seq, recv_ns = unpack(msg, start)
            if version == HEADER_VERSION and kind in KINDS:
                out.append((kind, pair_index, conn_id, seq, recv_ns,
                            msg[start + HEADER_SIZE:end]))
                continue
        out.append(_record(msg, start, end))
    return out


def _record(msg: bytes, start: int, end: int) -> tuple[int, int, int, int, int, bytes | str]:
    """unpack_inner's tuple for the message at msg[start:end]."""
    if end - start < HEADER_SIZE:
        return BAD, 0, 0, 0, 0, f"message of {end - start} bytes is shorter than the header"
    kind, version, pair_index, _, conn_id, seq, recv_ns = _unpack_from(msg, start)
    if version != HEADER_VERSION:
        return BAD, 0, 0, 0, 0, f"header version {version}, expected {HEADER_VERSION}"
    if kind not in KINDS:
        return BAD, 0, 0, 0, 0, f"unknown message kind {kind}"
    return kind, pair_index, conn_id, seq, recv_ns, msg[start + HEADER_SIZE:end]


class Batcher:
    """Collects outgoing messages for one PUSH socket; `flush()` sends them as one.

    `send` is the socket's send, called as send(bytes, zmq.NOBLOCK) by the caller's
    wrapper; this class stays free of zmq. A flush that cannot be sent (queue full)
    returns the number of messages dropped so the caller can count them.
    """

    __slots__ = ("pending", "limit")

    def __init__(self, limit: int = BATCH_LIMIT) -> None:
        self.pending: list[bytes] = []
        self.limit = limit

    def add(self, msg: bytes) -> bool:
        """Queue one message; True when the batch is full and should be flushed now."""
        self.pending.append(msg)
        return len(self.pending) >= self.limit

    def take(self) -> bytes | None:
        """The pending messages as one ZMQ message (a lone message goes as itself)."""
        p = self.pending
        if not p:
            return None
        self.pending = []
        return p[0] if len(p) == 1 else pack_batch(p)


class EventBatch:
    """A producer's bus events, framed as BATCH records as they are added.

    `add(topic, type_name, event_json)` then `take()` gives what `Batcher` gives for
    `pack_event(topic, type_name, event_json)` messages (a lone event goes as itself),
    without building each event message first: the header + topic + type prefix of
    each (topic, type) is made once and cached, and every event's bytes are copied
    once, by the final join (bookd: ~1.1 -> ~0.5 us per event).
    """

    __slots__ = ("parts", "count", "limit", "_prefixes")

    def __init__(self, limit: int = BATCH_LIMIT) -> None:
        self.parts: list[bytes] = [b""]  # [batch header] + [length, prefix, json] per event
        self.count = 0
        self.limit = limit
        self._prefixes: dict[tuple[str, str], bytes] = {}

    def add(self, topic: str, type_name: str, event_json: bytes) -> bool:
        """Queue one event; True when the batch is full and should be flushed now."""
        prefix = self._prefixes.get((topic, type_name))
        if prefix is None:
            if len(self._prefixes) >= 4096:  # topics are per pair: bounded in practice
                self._prefixes.clear()
            prefix = self._prefixes[topic, type_name] = event_prefix(topic, type_name)
        parts = self.parts
        parts.append(_pack_len(len(prefix) + len(event_json)))
        parts.append(prefix)
        parts.append(event_json)
        self.count = n = self.count + 1
        return n >= self.limit

    def take(self) -> bytes | None:
        """The pending events as one ZMQ message (a lone event goes as itself)."""
        n = self.count
        if not n:
            return None
        parts = self.parts
        self.parts = [b""]
        self.count = 0
        if n == 1:
            return parts[2] + parts[3]
        parts[0] = _pack(BATCH, HEADER_VERSION, NO_PAIR, n, 0, 0, 0)
        return b"".join(parts)
