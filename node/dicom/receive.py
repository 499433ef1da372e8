"""The lean receive path: once an association is established, its own thread reads the peer's
PDUs and serves each DIMSE message as soon as it is complete.

pynetdicom moves every PDU through three threads: its DUL thread reads the socket and runs
the state machine, the association thread polls a queue every millisecond for complete
messages, and each response goes back through the DUL thread's queue (polled as well). For a
storage SCP that is several hand-overs per instance, each waiting for a poll, and both
threads competing for the GIL. Here, after negotiation, the DUL thread is stopped and the
association thread does the reading and writing itself: read a PDU, hand it to pynetdicom's
DIMSE provider (which reassembles the message from its fragments), serve the message with
pynetdicom's service classes and event handlers, and write the response at once. A C-STORE's
data set is written to a spool file (``LeanAssociation.spool``) as it arrives, its middle
fragments straight from the PDU: the association holds PDUs in memory, never an instance.

pynetdicom keeps everything else: association negotiation (A-ASSOCIATE, the DUL state
machine until the A-ASSOCIATE-AC is sent), PDU decoding, DIMSE reassembly and encoding, the
service classes (C-ECHO, C-STORE, N-CREATE, N-SET) and the events the node's handlers are bound
to. The bounds of :class:`~node.dicom.transport.PeerLimits` apply as before: every read goes
through :class:`~node.dicom.transport.FastSocket` (PDU size limit, per-PDU deadline; the
deadline of a PDU's first bytes is the association's idle timeout).

A-RELEASE-RQ, A-ABORT, a closed connection and any PDU that has no place in an established
association end the association as pynetdicom would, with the same events (EVT_RELEASED,
EVT_ABORTED); an abort from our side (``Association.abort()``, e.g. at shutdown) is written
to the socket directly.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ABORT_RQ, A_RELEASE_RP, P_DATA_TF
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, A_RELEASE, P_DATA
from pynetdicom.transport import RequestHandler

from node.dicom.wire import c_store_rsp
from node.dicom.transport import FastSocket, PeerError, TICK_S, logged_decode, tune

log = logging.getLogger(__name__)

_P_DATA, _RELEASE_RQ, _ABORT = 0x04, 0x05, 0x07
#: The longest C-STORE-RSP command set (two 64-character UIDs) and its PDV header.
_LONGEST_RSP = 220
#: The largest data set of a message other than C-STORE (an MPPS N-CREATE or N-SET, a few KB)
#: that pynetdicom may hold in memory; a C-STORE data set is spooled to disk instead.
MAX_IN_MEMORY_DATA_SET = 16 * 1024 * 1024
#: How long the take-over waits for pynetdicom's DUL thread to send the A-ASSOCIATE-AC.
_HANDOVER_S = 5.0


class LeanAssociation(Association):
    """A pynetdicom acceptor association whose established phase runs on the lean path."""

    lean = False
    _in_memory = 0              # bytes of the data set being received that pynetdicom holds
    #: Where a C-STORE's data set is written while it is received: called with its SOP Class
    #: UID, SOP Instance UID and transfer syntax, returns a file-like object with ``name``
    #: (its path), ``offset`` (where the data set begins), ``write``, ``file.flush`` and
    #: ``close``. None: pynetdicom keeps the data set in memory.
    spool: Callable[[str, str, str], Any] | None = None
    _send_lock: threading.Lock

    def _run_reactor(self) -> None:
        sock = self.dul.socket
        if not isinstance(sock, FastSocket) or not self._take_over():
            if isinstance(sock, FastSocket):
                self._bound_pynetdicom_path(sock)
                sock.hold = False                 # pynetdicom's DUL thread reads from here on
            try:
                super()._run_reactor()
            finally:
                self._drop_spooled()
            return
        self.lean = True
        self._send_lock = threading.Lock()
        self.dul.send_pdu = self._send_now    # type: ignore[method-assign] - responses go straight out
        self.dimse.send_msg = self._send_msg  # type: ignore[method-assign]
        self._is_paused = True                    # nothing waits on pynetdicom's reactor checkpoint
        try:
            self._serve(sock)
        except Exception as exc:  # noqa: BLE001 - one line, not a thread's traceback
            if not sock.reported:
                sock._fail(f"association ended by {type(exc).__name__}: {str(exc)[:200]}")
            log.debug("lean receive path", exc_info=True)
            self._ended(send_abort=True)
        finally:
            self.is_established = False
            self._drop_spooled()
            self.kill()

    def _take_over(self) -> bool:
        """Wait for the DUL thread to send the A-ASSOCIATE-AC (state 6), then stop it. The
        socket is on hold since the A-ASSOCIATE-RQ was read, so the DUL thread has read nothing
        since and cannot be in the middle of a PDU."""
        dul = self.dul
        deadline = time.monotonic() + _HANDOVER_S
        while dul.state_machine.current_state != "Sta6" or not dul.to_provider_queue.empty():
            if time.monotonic() > deadline or not dul.is_alive():
                return False
            time.sleep(0.0002)
        dul.kill_dul()
        dul.join(timeout=_HANDOVER_S)
        return not dul.is_alive()

    def _bound_pynetdicom_path(self, sock: FastSocket) -> None:
        """The take-over failed, so pynetdicom's DUL thread serves this association: its data
        sets are bounded all the same. Each PDV is handed to pynetdicom's DIMSE provider on its
        own, so that a C-STORE's data set goes to a spool file from its first fragment on and
        any other is capped at :data:`MAX_IN_MEMORY_DATA_SET`; past that, one WARNING line and
        an A-ABORT, as pynetdicom's DUL does itself when its thread fails."""
        receive = self.dimse.receive_primitive

        def one_by_one(primitive: P_DATA) -> None:
            if self._kill:
                return
            try:
                for context_id, pdv in primitive.presentation_data_value_list:
                    control = pdv[0]
                    self._count_in_memory(control, len(pdv) - 1)
                    single = P_DATA()
                    single.presentation_data_value_list = [[context_id, pdv]]
                    receive(single)
                    self._received(control)
            except Exception as exc:  # noqa: BLE001 - untrusted bytes: any failure ends the association
                if not sock.reported:
                    sock._fail(f"invalid P-DATA ({type(exc).__name__}: {str(exc)[:100]})")
                self._drop_spooled()
                abort = A_ABORT_RQ()
                abort.source = 0x02
                try:
                    sock.send(abort.encode())
                except OSError:
                    pass
                self.is_aborted = True
                self.is_established = False
                self._kill = True
                self.dul._kill_thread = True

        self.dimse.receive_primitive = one_by_one   # type: ignore[method-assign]

    # ------------------------------------------------------------ the loop
    def _serve(self, sock: FastSocket) -> None:
        while not self._kill:
            try:
                pdu = _read_pdu(sock)
            except PeerError:                      # its one line is logged already
                self._ended(send_abort=True)
                return
            if pdu is None:                        # the peer closed the connection
                if not self._kill:
                    self._ended()
                return
            kind, body = pdu
            if kind == _P_DATA:
                if not self._receive(sock, body):
                    return
            elif kind == _RELEASE_RQ:
                self._send_now(_release_rp())
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                return
            elif kind == _ABORT:
                self._ended()
                return
            else:
                sock._fail(f"unexpected PDU of type 0x{kind:02X} in an established association")
                self._ended(send_abort=True)
                return

    def _receive(self, sock: FastSocket, data: bytearray) -> bool:
        """One P-DATA-TF: hand each of its PDVs to pynetdicom's DIMSE provider, which adds it to
        the message being received; a C-STORE's data set goes to a spool file from its first
        fragment on (see :attr:`spool`); serve every message completed. False when the
        association ended."""
        try:
            for context_id, control, fragment in _pdvs(data):
                spooled = getattr(self.dimse.message, "_data_set_file", None)
                if control & 0x03 == 0 and spooled is not None:
                    spooled.write(fragment)            # a middle fragment of a spooled data set
                    continue
                self._count_in_memory(control, len(fragment))
                primitive = P_DATA()
                primitive.presentation_data_value_list = [[context_id, bytes([control]) + fragment]]
                self.dimse.receive_primitive(primitive)
                self._received(control)
        except Exception as exc:  # noqa: BLE001 - untrusted bytes: any failure ends the association
            if not sock.reported:
                sock._fail(f"invalid P-DATA ({type(exc).__name__}: {str(exc)[:100]})")
            self._ended(send_abort=True)
            return False
        if not self.dul.event_queue.empty():       # pynetdicom flagged an invalid DIMSE message
            sock._fail("invalid DIMSE message")
            self._ended(send_abort=True)
            return False
        while not self._kill:
            context_id, msg = self.dimse.get_msg(block=False)
            if msg is None:
                break
            self._serve_request(msg, int(context_id or 0))   # pynetdicom's service classes and our handlers
        return not self._kill

    def _serve_request(self, msg: Any, context_id: int) -> None:
        """pynetdicom's, on either path; a message refused before its handler ran (an unknown
        SOP class, a C-STORE arriving during a release) leaves no spool file."""
        try:
            super()._serve_request(msg, context_id)
        finally:
            _remove_spooled(getattr(msg, "_dataset_file", None))

    def _count_in_memory(self, control: int, size: int) -> None:
        """Count a data set fragment that pynetdicom will keep in memory (one not spooled).

        Raises:
            ValueError: the data set has grown past :data:`MAX_IN_MEMORY_DATA_SET`.
        """
        if not control & 0x01 and getattr(self.dimse.message, "_data_set_file", None) is None:
            self._in_memory += size
            if self._in_memory > MAX_IN_MEMORY_DATA_SET:
                raise ValueError(f"a data set of more than {MAX_IN_MEMORY_DATA_SET} bytes "
                                 "in a message other than C-STORE")

    def _received(self, control: int) -> None:
        """A PDV was handed to pynetdicom: after the last fragment of a command set, the data set
        that follows starts afresh (and a C-STORE's goes to a spool file)."""
        if control & 0x03 == 0x03:
            self._in_memory = 0
            self._spool_data_set()

    def _spool_data_set(self) -> None:
        """The command set of a C-STORE-RQ is complete: its data set fragments are written to a
        file from ``spool`` as they come (pynetdicom's chunked receive, into our file)."""
        msg = self.dimse.message
        spool = self.spool
        if spool is None or not isinstance(msg, C_STORE_RQ) or msg._data_set_file is not None:
            return
        context = self._accepted_cx.get(int(msg.context_id or 0))
        if context is None:         # pynetdicom would abort once the data set is in; abort now
            raise ValueError(f"C-STORE-RQ on presentation context {msg.context_id}, which was not accepted")
        command = msg.command_set
        file = spool(str(command.get("AffectedSOPClassUID", "") or ""),
                     str(command.get("AffectedSOPInstanceUID", "") or ""), str(context.transfer_syntax[0]))
        msg._data_set_file = file
        msg._data_set_path = (Path(file.name), file.offset)

    def _drop_spooled(self) -> None:
        """An association that ended in the middle of a data set leaves no file behind."""
        _remove_spooled(getattr(self.dimse.message, "_data_set_file", None))

    def _ended(self, send_abort: bool = False) -> None:
        if self._sent_abort or self.is_aborted or self.is_released:
            return
        if send_abort:
            self._sent_abort = True
            primitive = A_P_ABORT()
            primitive.provider_reason = 0x00
            self._send_now(primitive)
        self.is_aborted = True
        self.is_established = False
        evt.trigger(self, evt.EVT_ABORTED, {})

    # ------------------------------------------------------------ writing
    def _send_msg(self, primitive: Any, context_id: int) -> None:
        """pynetdicom's ``dimse.send_msg``; a plain C-STORE response (a status, no error
        comment or offending element) is encoded by :func:`~node.dicom.wire.c_store_rsp`."""
        if (isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None
                and primitive.ErrorComment is None and primitive.OffendingElement is None
                and primitive.AffectedSOPClassUID and primitive.AffectedSOPInstanceUID
                and primitive.Status is not None
                and not (0 < (self.dimse.maximum_pdu_size or 0) < _LONGEST_RSP)):
            self._write(c_store_rsp(context_id, int(primitive.MessageIDBeingRespondedTo),
                                    str(primitive.AffectedSOPClassUID), str(primitive.AffectedSOPInstanceUID),
                                    int(primitive.Status)))
            return
        DIMSEServiceProvider.send_msg(self.dimse, primitive, context_id)

    def _send_now(self, primitive: Any) -> None:
        """pynetdicom's ``dul.send_pdu``, without the DUL thread: encode and write at once."""
        if isinstance(primitive, P_DATA):
            pdu: Any = P_DATA_TF()
        elif isinstance(primitive, (A_ABORT, A_P_ABORT)):
            pdu = A_ABORT_RQ()
        elif isinstance(primitive, A_RELEASE):
            pdu = A_RELEASE_RP()
        else:
            return
        pdu.from_primitive(primitive)
        self._write(pdu.encode())

    def _write(self, data: bytes) -> None:
        sock = self.dul.socket
        raw = sock.socket if sock is not None else None
        if raw is None:
            return
        try:
            with self._send_lock:
                raw.sendall(data)
        except OSError:
            pass        # the peer is gone; reading the socket ends the association

    def _abort_blocking(self, block: bool = True) -> None:
        if not self.lean:
            super()._abort_blocking(block)
            return
        if self._sent_abort or self.is_released:
            return
        self._ended(send_abort=True)
        self.kill()
        sock = self.dul.socket
        if sock is not None:
            try:
                sock._shutdown_socket()           # wakes the association thread's read
            except Exception:  # noqa: BLE001 - best effort, as pynetdicom does
                pass


def _pdvs(pdu: bytearray) -> Iterator[tuple[int, int, memoryview]]:
    """The presentation context ID, message control header and fragment (a view into the
    PDU, not a copy) of each PDV item of a P-DATA-TF PDU's body (PS3.8 9.3.5).

    Raises:
        ValueError: an item's length is shorter than its header or runs past the PDU.
    """
    view = memoryview(pdu)
    at, end = 0, len(pdu)
    while at < end:
        if end - at < 6:
            raise ValueError(f"{end - at} bytes after the last PDV item")
        length = int.from_bytes(view[at:at + 4], "big")
        if length < 2 or at + 4 + length > end:
            raise ValueError(f"PDV item of length {length} in a PDU of {end} bytes")
        yield view[at + 4], view[at + 5], view[at + 6:at + 4 + length]
        at += 4 + length


def _remove_spooled(file: Any) -> None:
    """A spool file that was not renamed into place (pynetdicom removes it itself only after
    a handler ran; a message refused before, or cut off, would leave it)."""
    if file is not None:
        file.close()
        Path(file.name).unlink(missing_ok=True)


def _release_rp() -> A_RELEASE:
    primitive = A_RELEASE()
    primitive.result = "affirmative"
    return primitive


def _read_pdu(sock: FastSocket) -> tuple[int, bytearray] | None:
    """One whole PDU: its type and its body (after the 6-byte header), or None when the peer
    closed the connection. The body's length is checked by ``sock`` before it is allocated."""
    head = sock.recv(6)
    if len(head) < 6:
        return None
    length = struct.unpack(">L", head[2:6])[0]
    body = sock.recv(length) if length else bytearray()
    if len(body) < length:
        return None
    return head[0], body


class FastRequestHandler(RequestHandler):
    """pynetdicom's request handler for accepted connections: :func:`~node.dicom.transport.tune`
    applied, the server's :class:`~node.dicom.transport.PeerLimits` (``server.peer_limits``) on
    the socket, and the established association served by :class:`LeanAssociation`."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        assoc.__class__ = LeanAssociation
        tune(assoc)
        sock = assoc.dul.socket
        if isinstance(sock, FastSocket):
            sock.limits = getattr(self.server, "peer_limits", None)
            assoc.spool = getattr(self.server, "spool", None)
            sock.connected_at = time.monotonic()
            if sock.limits is not None and sock.socket is not None:
                sock.socket.settimeout(TICK_S)
            assoc.dul._decode_pdu = logged_decode(assoc.dul._decode_pdu, sock)  # type: ignore[method-assign]
        return assoc
