"""TCP details under pynetdicom that matter for throughput on real networks.

Two things, applied to every association the node accepts or opens:

* reads go straight into one buffer per PDU (``recv_into``) instead of 4 KiB pieces;
* the association's network thread polls every 0.2 ms instead of 1 ms while the association
  is open (an instance needs several hand-overs between pynetdicom's threads; at 1 ms each
  they dominated the time per instance);
* every read re-arms ``TCP_QUICKACK``. Many DICOM peers (DCMTK-based ones such as Orthanc
  and ``storescp`` unless started with ``TCP_NODELAY=1``) write a response in two small
  writes with Nagle's algorithm on: the second waits for our ACK of the first, and Linux
  delays that ACK by ~40 ms. Acknowledging at once removes that stall from every instance.
"""

from __future__ import annotations

import socket
from typing import Any

from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
#: pynetdicom's DUL reactor sleep between idle polls (its default is 1 ms).
DUL_POLL_S = 0.0002


class FastSocket(AssociationSocket):
    """An :class:`AssociationSocket` that reads whole PDUs and acknowledges promptly."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        while got < nr_bytes:
            if _QUICKACK is not None:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                except OSError:  # not TCP (or an SSL wrapper refusing it): nothing to gain
                    pass
            n = sock.recv_into(view[got:], nr_bytes - got)
            if n == 0:
                del view
                return buf[:got]
            got += n
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


class FastRequestHandler(RequestHandler):
    """pynetdicom's request handler for accepted connections, with :func:`tune` applied."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        tune(assoc)
        return assoc
