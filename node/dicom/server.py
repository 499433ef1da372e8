"""The listener's TCP server: pynetdicom's threaded association server, with bounds on what
connections can hold (per source address and in all) and the TLS handshake off the accept
thread."""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from node.dicom.transport import PeerLimits, Throttle

log = logging.getLogger(__name__)


class ListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with bounds on what a connection can hold.

    * Connections are counted per source address (``ingest.max_associations_per_address``)
      and in all (twice ``node.max_associations``, so a connection that will be rejected
      with "local limit exceeded" still gets that answer); more are closed at once, with a
      log line per address at most every 10 s.
    * The TLS handshake runs on the connection's own thread with a deadline
      (``ingest.association_timeout_s``), never on the accept thread.
    * With ``reuse_port`` the port is shared with the node's other ingest processes
      (SO_REUSEPORT: the kernel spreads incoming connections over them).
    """

    reuse_port = False
    per_address = 8
    total = 32
    peer_limits: PeerLimits | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._handshakes: dict[str, int] = {}
        self._count_lock = threading.Lock()
        self._throttle = Throttle()
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        assert self.socket is not None
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        return self.socket.accept()          # TLS: wrapped later, on the connection's thread

    def _open_from(self, address: str) -> tuple[int, int]:
        active = self.ae.active_associations
        mine = sum(1 for a in active if a.requestor.address == address)
        return mine + self._handshakes.get(address, 0), len(active) + sum(self._handshakes.values())

    def verify_request(self, request: Any, client_address: Any) -> bool:
        address = str(client_address[0])
        with self._count_lock:
            mine, total = self._open_from(address)
            if mine < self.per_address and total < self.total:
                self._handshakes[address] = self._handshakes.get(address, 0) + 1
                return True
        why = (f"{mine} connections from that address already open (ingest.max_associations_per_address)"
               if mine >= self.per_address else f"{total} connections open in all")
        held = self._throttle.allow(address)
        if held is not None:
            log.warning("connection from %s refused: %s%s", address, why,
                        f" ({held} more refused since the last such line)" if held else "",
                        extra={"peer": address, "reason": why})
        return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0])
        try:
            if self.ssl_context is not None:
                request = self._handshake(request, client_address)
                if request is None:
                    return
            try:
                self.finish_request(request, client_address)
            except Exception:  # noqa: BLE001 - one connection's failure must not reach the server
                log.warning("connection from %s:%s failed before its association started",
                            *client_address[:2], exc_info=log.isEnabledFor(logging.DEBUG))
                self.shutdown_request(request)
        finally:
            with self._count_lock:   # the association (if any) is in active_associations now
                left = self._handshakes.get(address, 1) - 1
                if left > 0:
                    self._handshakes[address] = left
                else:
                    self._handshakes.pop(address, None)

    def _handshake(self, raw: socket.socket, client_address: Any) -> Any:
        assert self.ssl_context is not None and self.peer_limits is not None
        timeout = self.peer_limits.association_timeout_s
        try:
            raw.settimeout(timeout)
            wrapped = self.ssl_context.wrap_socket(raw, server_side=True)
            wrapped.settimeout(self.ae.network_timeout)
            return wrapped
        except (OSError, ValueError) as exc:
            reason = "no TLS handshake within %g s" % timeout if isinstance(exc, TimeoutError) else \
                f"TLS handshake failed: {exc}"
            log.warning("connection from %s:%s closed: %s", *client_address[:2], reason,
                        extra={"peer": str(client_address[0]), "reason": reason})
            try:
                raw.close()
            except OSError:
                pass
            return None
