"""HTTP/2 without I/O: a small framing layer and HPACK codec of our own (RFC 9113, RFC 7541).

``H2Endpoint`` is one side of one connection (server or client). ``receive(bytes)`` returns events
(``HeadersReceived``, ``DataReceived``, ``TrailersReceived``, ``StreamReset``, ``WindowOpened``,
``GoAwayReceived``, ``ConnectionFailed``); the ``send_*`` methods queue frames that ``data_to_send()``
returns.
Flow control is explicit: received DATA is only credited back (``acknowledge``) when the caller has passed it
on, and ``send_data`` sends no more than the peer's window allows and says how much it sent.

Why not the ``h2`` library: a proxy relays whole streams and needs only what is here (DATA, HEADERS +
CONTINUATION, WINDOW_UPDATE, RST_STREAM, SETTINGS, PING, GOAWAY); h2's general machinery (an event object, a
state-table pass and frame objects per frame, eager frame ``repr`` for its logger) and ``hpack``'s encoder and
decoder cost most of a sidecar's CPU per HTTP/2 request. Header values are neither validated nor normalized
(as the proxy had h2 configured). HPACK (``HeaderDecoder``, ``encode_headers``; ``hpack`` lends its static
table and Huffman decoder): what we send uses the static table and literals only, never the dynamic table and
never Huffman coding, so blocks are larger (loopback and pod networks: CPU over bytes) and cheap on both
sides; what we receive may use all of HPACK. The connection window is opened wide at once
(``CONNECTION_WINDOW``) while every stream keeps the default 64 KiB, so a slow reader still slows its writer.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from kizuna.protocols.hpack import MAX_HEADER_LIST_SIZE, CompressionFailure, HeaderDecoder, encode_headers
from kizuna.protocols.hpack import Headers as Headers  # what the h2 modules of the proxy use

MAX_CONCURRENT_STREAMS: Final = 1000
"""Streams a peer may open on one of our connections (h2's default is 100)."""
CONNECTION_WINDOW: Final = 2 ** 24
"""Our receive window for a whole connection (streams keep the default ``STREAM_WINDOW``)."""
STREAM_WINDOW: Final = 65_535
MAX_WINDOW: Final = 2 ** 31 - 1
FRAME_SIZE: Final = 16_384
"""The largest frame payload we take (the protocol default; we never raise it)."""
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Error codes (RFC 9113 section 7).
NO_ERROR: Final = 0
PROTOCOL_ERROR: Final = 1
INTERNAL_ERROR: Final = 2
FLOW_CONTROL_ERROR: Final = 3
STREAM_CLOSED: Final = 5
FRAME_SIZE_ERROR: Final = 6
REFUSED_STREAM: Final = 7
CANCEL: Final = 8
COMPRESSION_ERROR: Final = 9

# Frame types and flags.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM: Final = 0x1
ACK: Final = 0x1
END_HEADERS: Final = 0x4
PADDED: Final = 0x8
PRIORITY_FLAG: Final = 0x20

# SETTINGS identifiers.
HEADER_TABLE_SIZE, ENABLE_PUSH, SETTINGS_MAX_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 1, 2, 3, 4, 5
SETTINGS_MAX_HEADER_LIST = 6

_HEAD = struct.Struct(">BHBBL")  # length as 8 + 16 bits, type, flags, stream id
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_U32X2 = struct.Struct(">LL")


@dataclass(frozen=True, slots=True)
class HeadersReceived:
    """A request (server side) or response (client side) head; ``end_stream``: no body follows."""

    stream_id: int
    headers: Headers
    end_stream: bool


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Body bytes; ``flow_length`` (data plus padding) is what ``acknowledge`` must credit back."""

    stream_id: int
    data: bytes
    flow_length: int
    end_stream: bool


@dataclass(frozen=True, slots=True)
class TrailersReceived:
    """Trailing headers, which end the stream (gRPC puts its status here)."""

    stream_id: int
    headers: Headers


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer reset a stream (RST_STREAM) with ``error_code``."""

    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """The peer granted send window (``stream_id`` 0: the whole connection): pending data may go now."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer will take no new streams above ``last_stream_id``."""

    last_stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """The peer broke the protocol; the connection must close after ``data_to_send``."""

    reason: str


Event = (HeadersReceived | DataReceived | TrailersReceived | StreamReset | WindowOpened
         | GoAwayReceived | ConnectionFailed)


# -- frames and streams ---------------------------------------------------------------------------------------

class ProtocolFailure(Exception):
    """The peer broke the protocol: the connection ends with GOAWAY ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One serialized frame."""
    size = len(payload)
    return _HEAD.pack(size >> 16, size & 0xFFFF, kind, flags, stream_id) + payload


class Stream:
    """What one endpoint tracks of one stream."""

    __slots__ = ("out_window", "in_window", "unacked", "local_closed", "remote_closed", "head_seen", "outbound")

    def __init__(self, out_window: int, outbound: bool) -> None:
        self.out_window = out_window
        self.in_window = STREAM_WINDOW
        self.unacked = 0  # bytes credited by the caller, not yet granted to the peer in a WINDOW_UPDATE
        self.local_closed = False  # we sent END_STREAM
        self.remote_closed = False  # the peer sent END_STREAM
        self.head_seen = False  # the request (server side) or final response (client side) head arrived
        self.outbound = outbound


class H2Endpoint:
    """One side of an HTTP/2 connection, speaking prior-knowledge h2c (or h2 after ALPN)."""

    __slots__ = ("client_side", "streams", "out", "buffer", "preface_due", "decoder",
                 "out_window", "in_window", "unacked", "peer_initial_window", "peer_max_frame",
                 "peer_max_streams", "next_id", "highest_inbound", "outbound_open", "inbound_open", "block",
                 "failed", "encoder_reset")

    def __init__(self, client_side: bool) -> None:
        self.client_side = client_side
        self.streams: dict[int, Stream] = {}
        self.out: list[bytes] = []
        self.buffer = b""
        self.preface_due = not client_side  # a server first reads the client's connection preface
        self.encoder_reset = True  # our next header block first tells the peer we keep no dynamic table
        self.decoder = HeaderDecoder()
        self.out_window = STREAM_WINDOW  # the peer's connection window for what we send
        self.in_window = CONNECTION_WINDOW
        self.unacked = 0
        self.peer_initial_window = STREAM_WINDOW
        self.peer_max_frame = FRAME_SIZE
        self.peer_max_streams = 100  # until the peer's SETTINGS say (h2's choice too)
        self.next_id = 1 if client_side else 2
        self.highest_inbound = 0
        self.outbound_open = 0
        self.inbound_open = 0
        self.block: tuple[int, int, list[bytes]] | None = None  # a header block awaiting CONTINUATION
        self.failed = False
        settings = [(SETTINGS_MAX_STREAMS, MAX_CONCURRENT_STREAMS), (SETTINGS_MAX_HEADER_LIST, MAX_HEADER_LIST_SIZE)]
        if client_side:
            settings.insert(0, (ENABLE_PUSH, 0))
            self.out.append(PREFACE)
        self.out.append(frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in settings)))
        self.out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONNECTION_WINDOW - STREAM_WINDOW)))

    def data_to_send(self) -> bytes:
        """Frames queued since the last call."""
        out = self.out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    # -- receiving --------------------------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; our events for what they said."""
        if self.failed:
            return []
        events: list[Event] = []
        buffer = self.buffer + data if self.buffer else data
        try:
            if self.preface_due:
                if len(buffer) < len(PREFACE):
                    if not PREFACE.startswith(buffer):
                        raise ProtocolFailure(PROTOCOL_ERROR, "not the HTTP/2 connection preface")
                    self.buffer = buffer
                    return events
                if not buffer.startswith(PREFACE):
                    raise ProtocolFailure(PROTOCOL_ERROR, "not the HTTP/2 connection preface")
                self.preface_due = False
                buffer = buffer[len(PREFACE):]
            pos, end = 0, len(buffer)
            unpack = _HEAD.unpack_from
            while end - pos >= 9:
                high, low, kind, flags, stream_id = unpack(buffer, pos)
                size = high << 16 | low
                if size > FRAME_SIZE:
                    raise ProtocolFailure(FRAME_SIZE_ERROR, f"frame of {size} bytes")
                if end - pos - 9 < size:
                    break
                payload = buffer[pos + 9:pos + 9 + size]
                pos += 9 + size
                self._frame(kind, flags, stream_id & 0x7FFFFFFF, payload, events)
            self.buffer = buffer[pos:] if pos < end else b""
        except ProtocolFailure as exc:
            self.failed = True
            self.buffer = b""
            self.out.append(frame(GOAWAY, 0, 0, _U32X2.pack(self.highest_inbound, exc.code) + str(exc).encode()))
            events.append(ConnectionFailed(str(exc)))
        return events

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if self.block is not None and kind != CONTINUATION:
            raise ProtocolFailure(PROTOCOL_ERROR, "a header block was interrupted")
        if kind == DATA:
            self._data(flags, stream_id, payload, events)
        elif kind == HEADERS:
            if stream_id == 0:
                raise ProtocolFailure(PROTOCOL_ERROR, "HEADERS on stream 0")
            start, stop = 0, len(payload)
            if flags & PADDED:
                if not payload:
                    raise ProtocolFailure(PROTOCOL_ERROR, "HEADERS padding without its length")
                start, stop = 1, stop - payload[0]
            if flags & PRIORITY_FLAG:
                start += 5
            if stop < start:
                raise ProtocolFailure(PROTOCOL_ERROR, "HEADERS padding too long")
            fragment = payload[start:stop]
            if flags & END_HEADERS:
                self._headers(stream_id, flags & END_STREAM, fragment, events)
            else:
                self.block = (stream_id, flags & END_STREAM, [fragment])
        elif kind == CONTINUATION:
            block = self.block
            if block is None or block[0] != stream_id:
                raise ProtocolFailure(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
            block[2].append(payload)
            if sum(map(len, block[2])) > MAX_HEADER_LIST_SIZE:  # endless CONTINUATION: bounded, not buffered
                raise ProtocolFailure(PROTOCOL_ERROR, "header block too large")
            if flags & END_HEADERS:
                self.block = None
                self._headers(stream_id, block[1], b"".join(block[2]), events)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload, events)
        elif kind == RST_STREAM:
            if len(payload) != 4 or stream_id == 0:
                raise ProtocolFailure(FRAME_SIZE_ERROR if len(payload) != 4 else PROTOCOL_ERROR, "bad RST_STREAM")
            if self._forget(stream_id):
                events.append(StreamReset(stream_id, _U32.unpack(payload)[0]))
        elif kind == SETTINGS:
            if flags & ACK:
                return
            if stream_id != 0 or len(payload) % 6:
                raise ProtocolFailure(FRAME_SIZE_ERROR, "bad SETTINGS")
            self._settings(payload)
            self.out.append(frame(SETTINGS, ACK, 0))
            events.append(WindowOpened(0))  # a new INITIAL_WINDOW_SIZE may open every stream
        elif kind == PING:
            if len(payload) != 8 or stream_id != 0:
                raise ProtocolFailure(FRAME_SIZE_ERROR, "bad PING")
            if not flags & ACK:
                self.out.append(frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            if len(payload) < 8:
                raise ProtocolFailure(FRAME_SIZE_ERROR, "bad GOAWAY")
            last, code = _U32X2.unpack_from(payload)
            events.append(GoAwayReceived(last & 0x7FFFFFFF, code))
        elif kind == PUSH_PROMISE:
            raise ProtocolFailure(PROTOCOL_ERROR, "PUSH_PROMISE, though push was not enabled")
        # PRIORITY and unknown frame types are ignored (RFC 9113 5.3.2, 4.1).

    def _data(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id == 0:
            raise ProtocolFailure(PROTOCOL_ERROR, "DATA on stream 0")
        flow = len(payload)
        self.in_window -= flow
        if self.in_window < 0:
            raise ProtocolFailure(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            # A stream we reset or that is over: its bytes still count against the connection window.
            self.acknowledge(0, flow)
            if stream is not None or self._idle(stream_id):
                self._reject(stream_id, STREAM_CLOSED if stream is not None else PROTOCOL_ERROR)
            return
        stream.in_window -= flow
        if stream.in_window < 0:
            self.acknowledge(0, flow)
            self._reject(stream_id, FLOW_CONTROL_ERROR)
            events.append(StreamReset(stream_id, FLOW_CONTROL_ERROR))
            return
        data = payload
        if flags & PADDED:
            if not payload or payload[0] >= flow:
                raise ProtocolFailure(PROTOCOL_ERROR, "DATA padding too long")
            data = payload[1:flow - payload[0]]
        end = bool(flags & END_STREAM)
        if end:
            stream.remote_closed = True
            if stream.local_closed:
                self._forget(stream_id)
        events.append(DataReceived(stream_id, data, flow, end))

    def _headers(self, stream_id: int, end: int, block: bytes, events: list[Event]) -> None:
        try:
            headers = self.decoder.decode(block)
        except CompressionFailure as exc:
            raise ProtocolFailure(COMPRESSION_ERROR, f"header block: {exc}") from exc
        stream = self.streams.get(stream_id)
        if stream is None:
            if self.client_side or stream_id % 2 == 0:
                if self._idle(stream_id):
                    raise ProtocolFailure(PROTOCOL_ERROR, f"HEADERS on idle stream {stream_id}")
                return  # a stream we reset: what it still sends is dropped
            if stream_id <= self.highest_inbound:
                self._reject(stream_id, STREAM_CLOSED)
                return
            self.highest_inbound = stream_id
            if self.inbound_open >= MAX_CONCURRENT_STREAMS:
                self.out.append(frame(RST_STREAM, 0, stream_id, _U32.pack(REFUSED_STREAM)))
                return
            stream = self.streams[stream_id] = Stream(self.peer_initial_window, False)
            self.inbound_open += 1
        elif stream.remote_closed:
            self._reject(stream_id, STREAM_CLOSED)
            return
        if end:
            stream.remote_closed = True
        if not stream.head_seen:
            if self.client_side and headers and headers[0][0] == b":status" and headers[0][1][:1] == b"1" \
                    and not end:
                return  # 1xx: nothing a gRPC or h2c client needs forwarded
            stream.head_seen = True
            events.append(HeadersReceived(stream_id, headers, bool(end)))
        else:
            stream.remote_closed = True  # trailers end the stream, with or without the flag
            events.append(TrailersReceived(stream_id, headers))
        if stream.remote_closed and stream.local_closed:
            self._forget(stream_id)

    def _window_update(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            raise ProtocolFailure(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise ProtocolFailure(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.out_window += increment
            if self.out_window > MAX_WINDOW:
                raise ProtocolFailure(FLOW_CONTROL_ERROR, "connection window overflow")
            events.append(WindowOpened(0))
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.out_window += increment
        if increment == 0 or stream.out_window > MAX_WINDOW:
            code = PROTOCOL_ERROR if increment == 0 else FLOW_CONTROL_ERROR
            self._reject(stream_id, code)
            events.append(StreamReset(stream_id, code))
            return
        events.append(WindowOpened(stream_id))

    def _settings(self, payload: bytes) -> None:
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == HEADER_TABLE_SIZE:
                self.encoder_reset = True  # whatever the new size, we say again that we use none of it
            elif key == ENABLE_PUSH and value > 1:
                raise ProtocolFailure(PROTOCOL_ERROR, "ENABLE_PUSH above 1")
            elif key == SETTINGS_MAX_STREAMS:
                self.peer_max_streams = value
            elif key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolFailure(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.out_window += delta
            elif key == MAX_FRAME_SIZE:
                if not FRAME_SIZE <= value <= 2 ** 24 - 1:
                    raise ProtocolFailure(PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value

    def _idle(self, stream_id: int) -> bool:
        """True when ``stream_id`` was never opened (by either side) on this connection."""
        if stream_id % 2 == (1 if self.client_side else 0):  # ours
            return stream_id >= self.next_id
        return stream_id > self.highest_inbound

    def _reject(self, stream_id: int, code: int) -> None:
        self._forget(stream_id)
        self.out.append(frame(RST_STREAM, 0, stream_id, _U32.pack(code)))

    def _forget(self, stream_id: int) -> bool:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return False
        if stream.outbound:
            self.outbound_open -= 1
        else:
            self.inbound_open -= 1
        return True

    # -- sending ----------------------------------------------------------------------------------------

    def next_stream_id(self) -> int:
        """The id for a new outbound stream."""
        return self.next_id

    def can_open_stream(self) -> bool:
        """True while the peer allows another concurrent stream from us."""
        return self.outbound_open < self.peer_max_streams and self.next_id < MAX_WINDOW

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None:
        """A request (client side, on ``next_stream_id()``), response or trailers head; on a stream that is
        already over, nothing."""
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id != self.next_id or not self.client_side:
                return
            stream = self.streams[stream_id] = Stream(self.peer_initial_window, True)
            self.outbound_open += 1
            self.next_id += 2
        elif stream.local_closed:
            return
        block = encode_headers(headers, self.encoder_reset)
        self.encoder_reset = False
        limit = self.peer_max_frame
        flags = END_STREAM if end_stream else 0
        if len(block) <= limit:
            self.out.append(frame(HEADERS, flags | END_HEADERS, stream_id, block))
        else:
            self.out.append(frame(HEADERS, flags, stream_id, block[:limit]))
            for at in range(limit, len(block), limit):
                last = at + limit >= len(block)
                self.out.append(frame(CONTINUATION, END_HEADERS if last else 0, stream_id, block[at:at + limit]))
        if end_stream:
            self._close_local(stream_id, stream)

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> int:
        """Send as much of ``data`` as the windows and frame size allow; the count sent. ``end_stream`` only
        takes effect when all of it went. On a stream that is already over, the data is dropped (all of it
        counts as sent: it has nowhere to go)."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed:
            return len(data)
        size = len(data)
        window = min(self.out_window, stream.out_window, size)
        if window <= 0:
            if end_stream and not size:
                self.out.append(frame(DATA, END_STREAM, stream_id))
                self._close_local(stream_id, stream)
            return 0
        limit = self.peer_max_frame
        sent = 0
        out = self.out
        while sent < window:
            chunk = min(limit, window - sent)
            last = end_stream and sent + chunk == size
            out.append(frame(DATA, END_STREAM if last else 0, stream_id, bytes(data[sent:sent + chunk])))
            sent += chunk
        self.out_window -= sent
        stream.out_window -= sent
        if end_stream and sent == size:
            self._close_local(stream_id, stream)
        return sent

    def end_stream(self, stream_id: int) -> None:
        """END_STREAM (an empty DATA frame) after what was sent."""
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.local_closed:
            self.out.append(frame(DATA, END_STREAM, stream_id))
            self._close_local(stream_id, stream)

    def _close_local(self, stream_id: int, stream: Stream) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            self._forget(stream_id)

    def acknowledge(self, stream_id: int, length: int) -> None:
        """Credit ``length`` received bytes back to the peer (they were passed on). WINDOW_UPDATEs go once half
        a window is owed, as h2 and most stacks do, not for every frame."""
        if length <= 0:
            return
        self.unacked += length
        if self.unacked >= CONNECTION_WINDOW // 2:
            self.out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.unacked)))
            self.in_window += self.unacked
            self.unacked = 0
        stream = self.streams.get(stream_id) if stream_id else None
        if stream is not None and not stream.remote_closed:
            stream.unacked += length
            if stream.unacked >= STREAM_WINDOW // 2:
                self.out.append(frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(stream.unacked)))
                stream.in_window += stream.unacked
                stream.unacked = 0

    def reset(self, stream_id: int, code: int = CANCEL) -> None:
        """RST_STREAM; a stream already over is left alone."""
        if stream_id in self.streams:
            self._reject(stream_id, code)

    def goaway(self, code: int = 0) -> None:
        """GOAWAY: no new streams; those open may finish."""
        self.out.append(frame(GOAWAY, 0, 0, _U32X2.pack(self.highest_inbound, code)))

    def stream_open(self, stream_id: int) -> bool:
        return stream_id in self.streams


def grpc_timeout(value: bytes) -> float | None:
    """``grpc-timeout`` (``100m``, ``5S``, ``1H``…) in seconds; None if malformed."""
    # (multiplier, divisor): sub-second units divide, so 100u is exactly 1e-4 s.
    units = {b"H": (3600, 1), b"M": (60, 1), b"S": (1, 1),
             b"m": (1, 10**3), b"u": (1, 10**6), b"n": (1, 10**9)}
    unit = units.get(value[-1:])
    if unit is None or len(value) < 2 or len(value) > 9 or not value[:-1].isdigit():
        return None
    return int(value[:-1]) * unit[0] / unit[1]
