"""DICOM TLS (PS3.15 B.9, BCP 195): TLS 1.2 or newer for the listener and for delivery."""

from __future__ import annotations

import ssl

from node.config.schema import TlsSection
from node.errors import ConfigError


def server_context(cfg: TlsSection) -> ssl.SSLContext:
    """The listener's context: our certificate; client certificates verified against
    ``ca_file`` (required when ``require_client_cert``).

    Raises:
        ConfigError: a file is missing or unreadable.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cfg)
    if cfg.ca_file:
        _load_ca(ctx, cfg)
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(cfg: TlsSection) -> ssl.SSLContext:
    """The context for outgoing associations: the peer's certificate and host name verified
    against ``ca_file`` (or the system's CAs); our certificate offered when we have one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.ca_file:
        _load_ca(ctx, cfg)
    else:
        ctx.load_default_certs()
    if cfg.cert_file:
        _load_chain(ctx, cfg)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cfg: TlsSection) -> None:
    try:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls.cert_file / tls.key_file: cannot load {cfg.cert_file}: {exc}") from None


def _load_ca(ctx: ssl.SSLContext, cfg: TlsSection) -> None:
    try:
        ctx.load_verify_locations(cfg.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls.ca_file: cannot load {cfg.ca_file}: {exc}") from None
