"""Bearer tokens and roles.

``http.tokens_file`` holds one token per line: ``<role> <token>`` or ``<role> <name> <token>``
(the name is what the audit records for that token's actions; without it, the role).
Roles: ``viewer`` reads, ``operator`` reads and acts (retry, reload), ``sender`` stores by
DICOMweb STOW-RS. Without a tokens file the server only binds to loopback and every local
caller is the operator ``local``.

Browsers cannot send an ``Authorization`` header on a plain link, so the dashboard's login
form puts the token into an HttpOnly, SameSite=Strict cookie that is read the same way.
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from node.errors import ConfigError

log = logging.getLogger(__name__)

ROLES = ("viewer", "operator", "sender")
#: Which roles a request needs one of, per kind of access.
GRANTS = {"viewer": ("viewer", "operator"), "operator": ("operator",), "sender": ("sender", "operator")}
COOKIE = "ainode_token"


@dataclass(frozen=True)
class Principal:
    role: str
    name: str


LOCAL = Principal("operator", "local")


class Tokens:
    """The tokens of ``http.tokens_file`` (empty: no file, loopback only, no tokens needed)."""

    def __init__(self, entries: dict[str, Principal]) -> None:
        self._entries = entries

    @property
    def required(self) -> bool:
        return bool(self._entries)

    @classmethod
    def load(cls, path: str) -> "Tokens":
        """Raises:
            ConfigError: the file is missing, a line is malformed or a role unknown (the line
                number is named; a token itself never is)."""
        if not path:
            return cls({})
        file = Path(path)
        try:
            text = file.read_text()
        except OSError as exc:
            raise ConfigError(f"http.tokens_file: cannot read {path}: {exc.strerror or exc}") from None
        if stat.S_IMODE(os.stat(file).st_mode) & 0o077:
            log.warning("http.tokens_file %s can be read by other users; chmod 600 it", path)
        entries: dict[str, Principal] = {}
        for number, line in enumerate(text.splitlines(), 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            if len(words) not in (2, 3) or words[0] not in ROLES:
                raise ConfigError(f"http.tokens_file {path} line {number}: expected '<role> [<name>] <token>' "
                                  f"with a role of {', '.join(ROLES)}")
            token = words[-1]
            if len(token) < 16:
                raise ConfigError(f"http.tokens_file {path} line {number}: a token needs at least 16 characters")
            entries[token] = Principal(words[0], words[1] if len(words) == 3 else words[0])
        if not entries:
            raise ConfigError(f"http.tokens_file {path}: no tokens")
        return cls(entries)

    def find(self, token: str | None) -> Principal | None:
        if not token:
            return None
        for known, principal in self._entries.items():   # constant time per comparison
            if hmac.compare_digest(known.encode(), token.encode()):
                return principal
        return None
