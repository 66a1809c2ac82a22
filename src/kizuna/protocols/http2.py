"""HTTP/2 without I/O: the ``h2`` state machine behind a small interface of our own events.

``H2Endpoint`` is one side of one connection (server or client). ``receive(bytes)`` returns events
(``HeadersReceived``, ``DataReceived``, ``TrailersReceived``, ``StreamReset``, ``WindowOpened``,
``GoAwayReceived``, ``ConnectionFailed``); the ``send_*`` methods queue frames that ``data_to_send()``
returns.
Flow control is explicit: received DATA is only credited back (``acknowledge``) when the caller has passed it
on, and ``send_data`` sends no more than the peer's window allows and says how much it sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

Headers = list[tuple[bytes, bytes]]

MAX_CONCURRENT_STREAMS: Final = 1000
"""Streams a peer may open on one of our connections (h2's default is 100)."""
CANCEL: Final = int(h2.errors.ErrorCodes.CANCEL)
REFUSED_STREAM: Final = int(h2.errors.ErrorCodes.REFUSED_STREAM)
INTERNAL_ERROR: Final = int(h2.errors.ErrorCodes.INTERNAL_ERROR)


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


class H2Endpoint:
    """One side of an HTTP/2 connection, speaking prior-knowledge h2c."""

    __slots__ = ("conn", "client_side", "_extra")

    def __init__(self, client_side: bool) -> None:
        self.client_side = client_side
        config = h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                           validate_inbound_headers=False, normalize_inbound_headers=False,
                                           validate_outbound_headers=False, normalize_outbound_headers=False)
        self.conn = h2.connection.H2Connection(config)
        self.conn.local_settings = h2.settings.Settings(client=client_side, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 2 ** 16,
        })
        self.conn.initiate_connection()
        self._extra = b""  # frames written past h2's state machine (a graceful GOAWAY)

    def data_to_send(self) -> bytes:
        """Frames queued since the last call."""
        data = self.conn.data_to_send()
        if self._extra:
            data, self._extra = data + self._extra, b""
        return data

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; our events for what they said."""
        try:
            raw = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            return [ConnectionFailed(str(exc) or type(exc).__name__)]
        out: list[Event] = []
        for ev in raw:
            if isinstance(ev, (h2.events.RequestReceived, h2.events.ResponseReceived)):
                assert ev.stream_id is not None and ev.headers is not None
                out.append(HeadersReceived(ev.stream_id, _as_bytes(ev.headers), ev.stream_ended is not None))
            elif isinstance(ev, h2.events.InformationalResponseReceived):
                continue  # 1xx: nothing a gRPC or h2c client needs forwarded
            elif isinstance(ev, h2.events.DataReceived):
                assert ev.stream_id is not None and ev.data is not None
                out.append(DataReceived(ev.stream_id, ev.data, ev.flow_controlled_length or 0,
                                        ev.stream_ended is not None))
            elif isinstance(ev, h2.events.TrailersReceived):
                assert ev.stream_id is not None and ev.headers is not None
                out.append(TrailersReceived(ev.stream_id, _as_bytes(ev.headers)))
            elif isinstance(ev, h2.events.StreamEnded):
                # Reported through end_stream of the HEADERS/DATA event that carried it (h2 reports an empty
                # DATA frame too); trailers end the stream themselves.
                continue
            elif isinstance(ev, h2.events.StreamReset):
                assert ev.stream_id is not None
                out.append(StreamReset(ev.stream_id, int(ev.error_code or 0)))
            elif isinstance(ev, h2.events.WindowUpdated):
                out.append(WindowOpened(ev.stream_id or 0))
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                out.append(WindowOpened(0))  # a new INITIAL_WINDOW_SIZE may open every stream
            elif isinstance(ev, h2.events.ConnectionTerminated):
                out.append(GoAwayReceived(ev.last_stream_id or 0, int(ev.error_code or 0)))
        return out

    def next_stream_id(self) -> int:
        """The id for a new outbound stream."""
        return int(self.conn.get_next_available_stream_id())

    def can_open_stream(self) -> bool:
        """True while the peer allows another concurrent stream from us."""
        return bool(self.conn.open_outbound_streams < self.conn.remote_settings.max_concurrent_streams)

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None:
        self.conn.send_headers(stream_id, headers, end_stream=end_stream)

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> int:
        """Send as much of ``data`` as the windows and frame size allow; the count sent. ``end_stream`` only
        takes effect when all of it went."""
        window = min(self.conn.local_flow_control_window(stream_id), len(data))
        frame = self.conn.max_outbound_frame_size
        sent = 0
        while sent < window:
            size = min(frame, window - sent)
            last = end_stream and sent + size == len(data)
            self.conn.send_data(stream_id, bytes(data[sent:sent + size]), end_stream=last)
            sent += size
        if end_stream and not data:
            self.conn.send_data(stream_id, b"", end_stream=True)
        return sent

    def end_stream(self, stream_id: int) -> None:
        self.conn.end_stream(stream_id)

    def acknowledge(self, stream_id: int, length: int) -> None:
        """Credit ``length`` received bytes back to the peer (they were passed on)."""
        if length <= 0:
            return
        try:
            self.conn.acknowledge_received_data(length, stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass  # the stream is gone; h2 still credits the connection window on its own

    def reset(self, stream_id: int, code: int = CANCEL) -> None:
        try:
            self.conn.reset_stream(stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass  # already closed: nothing to reset

    def goaway(self, code: int = 0) -> None:
        """GOAWAY: no new streams; those open may finish. Serialized here because h2's ``close_connection``
        moves the whole connection to CLOSED, after which open streams could send nothing more."""
        frame = hyperframe.frame.GoAwayFrame(0)
        frame.last_stream_id = self.conn.highest_inbound_stream_id
        frame.error_code = code
        self._extra += frame.serialize()

    def stream_open(self, stream_id: int) -> bool:
        return stream_id in self.conn.streams and not self.conn.streams[stream_id].closed


def _as_bytes(headers: object) -> Headers:
    return [(bytes(n), bytes(v)) for n, v in headers]  # type: ignore[attr-defined]


def grpc_timeout(value: bytes) -> float | None:
    """``grpc-timeout`` (``100m``, ``5S``, ``1H``…) in seconds; None if malformed."""
    # (multiplier, divisor): sub-second units divide, so 100u is exactly 1e-4 s.
    units = {b"H": (3600, 1), b"M": (60, 1), b"S": (1, 1),
             b"m": (1, 10**3), b"u": (1, 10**6), b"n": (1, 10**9)}
    unit = units.get(value[-1:])
    if unit is None or len(value) < 2 or len(value) > 9 or not value[:-1].isdigit():
        return None
    return int(value[:-1]) * unit[0] / unit[1]
