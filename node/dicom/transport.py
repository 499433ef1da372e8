"""The TCP layer under pynetdicom: throughput on real networks, and bounds against peers.

Applied to every association the node accepts (the bounds) or opens (the speed):

* reads go straight into one buffer per PDU (``recv_into``) instead of 4 KiB pieces;
* the association's network thread polls every 0.2 ms instead of 1 ms while the association
  is open (an instance needs several hand-overs between pynetdicom's threads; at 1 ms each
  they dominated the time per instance);
* every read re-arms ``TCP_QUICKACK``. Many DICOM peers (DCMTK-based ones such as Orthanc
  and ``storescp`` unless started with ``TCP_NODELAY=1``) write a response in two small
  writes with Nagle's algorithm on: the second waits for our ACK of the first, and Linux
  delays that ACK by ~40 ms. Acknowledging at once removes that stall from every instance.

Bounds on what a peer can make the listener do (:class:`PeerLimits`):

* a PDU longer than the limit is never allocated: before the association is established
  the limit is :data:`PRE_ASSOCIATION_MAX_PDU` (an A-ASSOCIATE-RQ is small), afterwards the
  maximum PDU we announced; a longer one is answered with an A-ABORT and closed;
* the A-ASSOCIATE-RQ must be complete within ``association_timeout_s`` of the connection
  (ARTIM), and every later PDU within ``network_timeout_s`` of its first byte: bytes that
  trickle in do not extend either deadline;
* each failure is one WARNING line that names the peer and the reason (pynetdicom's own
  error lines and tracebacks for it are kept for DEBUG, see :class:`QuietPynetdicom`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket

log = logging.getLogger(__name__)

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
#: pynetdicom's DUL reactor sleep between idle polls (its default is 1 ms).
DUL_POLL_S = 0.0002
#: The longest PDU accepted before the association is established (an A-ASSOCIATE-RQ with
#: pynetdicom's 128 presentation contexts of many transfer syntaxes each is ~100 KB).
PRE_ASSOCIATION_MAX_PDU = 256 * 1024
#: With ``ingest.max_pdu_size = 0`` (no limit announced) a PDU is still at most this long.
UNLIMITED_PDU_CAP = 64 * 1024 * 1024
#: A-ABORT from the service provider (source 2), reason "invalid PDU parameter value" (6).
_ABORT_INVALID_PDU = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6])
_PDU_TYPES = range(0x01, 0x08)
#: How long one read or write on an accepted connection may wait: the granularity at which
#: the deadlines are enforced (and a peer that stops reading its responses is dropped).
TICK_S = 2.0


@dataclass(frozen=True)
class PeerLimits:
    """Bounds on one accepted connection."""

    max_pdu: int                      # the maximum PDU we announce (0: none announced)
    association_timeout_s: float = 5.0
    network_timeout_s: float = 60.0
    throttle: "Throttle" = field(default_factory=lambda: Throttle(), compare=False)

    @property
    def established_pdu_limit(self) -> int:
        # The announced maximum is for the PDU's variable field; allow a little for peers
        # that count the header in.
        return self.max_pdu + 1024 if self.max_pdu else UNLIMITED_PDU_CAP


class PeerError(OSError):
    """A peer broke a bound; the connection is closed (pynetdicom sees a closed transport)."""


class FastSocket(AssociationSocket):
    """An :class:`AssociationSocket` that reads whole PDUs, acknowledges promptly and, on
    accepted connections, holds the peer to :class:`PeerLimits`."""

    limits: PeerLimits | None = None
    connected_at: float = 0.0
    reported: bool = False            # a WARNING about this connection was logged already
    _pdu_deadline: float = 0.0
    _got_request: bool = False        # the A-ASSOCIATE-RQ (the first PDU) was read whole
    #: pynetdicom's DUL thread does not read (``ready`` is False): set once the A-ASSOCIATE-RQ is
    #: read, until the association thread takes the socket over (node.dicom.receive).
    hold: bool = False

    def _peer(self) -> str:
        r = self.assoc.requestor
        return f"{r.address}:{r.port}"

    def _fail(self, reason: str, abort: bool = False) -> PeerError:
        if not self.reported:
            self.reported = True
            address = str(self.assoc.requestor.address)
            held = self.limits.throttle.allow(address) if self.limits is not None else 0
            if held is not None:
                log.warning("connection from %s closed: %s%s", self._peer(), reason,
                            f" ({held} more such lines from this address held back)" if held else "",
                            extra={"peer": self._peer(), "reason": reason})
        if abort and self.socket is not None:
            try:
                self.socket.sendall(_ABORT_INVALID_PDU)
            except OSError:
                pass
        self._ended_before_request()
        return PeerError(reason)

    def close(self) -> None:
        if self.limits is not None and not self._got_request and not self.reported:
            # pynetdicom's own ARTIM timer closed it: no A-ASSOCIATE-RQ came in time
            self._fail(f"no A-ASSOCIATE-RQ within {self.limits.association_timeout_s:g} s")
        super().close()

    def _ended_before_request(self) -> None:
        """The connection ended before its A-ASSOCIATE-RQ: wake pynetdicom's acceptor, which
        otherwise holds an association slot until its ACSE timeout, waiting for a request that
        cannot come (it reads the wake-up as that timeout, and ends)."""
        if self.limits is not None and not self._got_request:
            self._got_request = True          # once
            self.assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]

    @property
    def ready(self) -> bool:
        return False if self.hold else bool(super().ready)

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        limits = self.limits
        if limits is not None:
            established = self.assoc.is_established
            if nr_bytes == 6:                 # a new PDU begins: its whole read has one deadline
                self._pdu_deadline = (time.monotonic() + limits.network_timeout_s if established
                                      else self.connected_at + limits.association_timeout_s)
            else:
                limit = limits.established_pdu_limit if established else PRE_ASSOCIATION_MAX_PDU
                if nr_bytes > limit:
                    raise self._fail(f"PDU of {nr_bytes} bytes exceeds the limit of {limit} bytes"
                                     f"{'' if established else ' before association'}", abort=True)
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        try:
            while got < nr_bytes:
                # An accepted socket waits at most TICK_S per recv (set once, in the request
                # handler), so the PDU's deadline is checked however the bytes trickle in.
                if limits is not None and time.monotonic() > self._pdu_deadline:
                    raise self._fail("PDU not received in time (A-ASSOCIATE-RQ within "
                                     f"{limits.association_timeout_s:g} s, others within "
                                     f"{limits.network_timeout_s:g} s)")
                if _QUICKACK is not None:
                    try:
                        sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                    except OSError:  # not TCP (or an SSL wrapper refusing it): nothing to gain
                        pass
                try:
                    n = sock.recv_into(view[got:], nr_bytes - got)
                except (socket.timeout, TimeoutError):
                    if limits is None:
                        raise
                    continue                  # the deadline check above decides
                except OSError as exc:
                    if limits is not None:
                        raise self._fail(f"{type(exc).__name__}: {exc.strerror or exc}") from None
                    raise
                if n == 0:
                    self._ended_before_request()
                    return buf[:got]
                got += n
                if limits is not None and nr_bytes == 6 and buf[0] not in _PDU_TYPES:
                    self._fail(f"not DICOM (first bytes {bytes(buf[:got])[:6]!r})")
            if limits is not None and nr_bytes != 6 and not established:
                self._got_request = True
                self.hold = True
        finally:
            del view
        return buf


def tune(assoc: Association) -> None:
    """Switch an association's socket to :class:`FastSocket` and disable Nagle on our side."""
    sock = assoc.dul.socket
    if sock is None or not isinstance(sock, AssociationSocket):
        return
    if type(sock) is AssociationSocket:
        sock.__class__ = FastSocket
    assoc.dul._run_loop_delay = DUL_POLL_S
    raw = sock.socket
    if raw is not None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def logged_decode(decode: Any, sock: FastSocket) -> Any:
    """pynetdicom's PDU decoder, with our one WARNING line when a peer's PDU cannot be decoded
    (pynetdicom then aborts the association, as before)."""
    def checked(data: bytearray) -> Any:
        try:
            return decode(data)
        except Exception as exc:
            sock._fail(f"undecodable PDU of type 0x{data[0]:02X}, {len(data)} bytes "
                       f"({type(exc).__name__}: {str(exc)[:100]})")
            raise
    return checked


class Throttle:
    """At most one log line per key (a peer's address) per ``interval_s``; the lines held back
    are counted into the next one, so a flood of connections cannot flood the log."""

    def __init__(self, interval_s: float = 10.0, max_keys: int = 1024) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> int | None:
        """The number of lines held back since the last one, or None to hold this one back."""
        now = time.monotonic()
        with self._lock:
            last, held = self._last.get(key, (-1e18, 0))
            if now - last < self.interval_s:
                self._last[key] = (last, held + 1)
                return None
            if len(self._last) >= self.max_keys:
                self._last.clear()
            self._last[key] = (now, 0)
            return held


class QuietPynetdicom(logging.Filter):
    """pynetdicom logs a broken or hostile peer as several ERROR lines with tracebacks; the
    node logs one WARNING of its own instead. This filter turns pynetdicom's ERROR records into
    DEBUG ones (shown with ``--log-level DEBUG``, without the traceback otherwise)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("pynetdicom") and record.levelno >= logging.ERROR:
            if not logging.getLogger("node").isEnabledFor(logging.DEBUG):
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def quiet_pynetdicom() -> None:
    """Install :class:`QuietPynetdicom` on the root logger's handlers (pynetdicom's records
    come from its modules' loggers and reach the root's handlers; once per handler)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, QuietPynetdicom) for f in handler.filters):
            handler.addFilter(QuietPynetdicom())
