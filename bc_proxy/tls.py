"""HTTPS serving: the server's ssl.SSLContext from `server.tls_cert_file` / `tls_key_file`.

Used by `serve` (passed to aiohttp's run_app) and by `check-config`, which fails when either
file is unreadable or they are not a matching certificate and key.
"""

from __future__ import annotations

import ssl

from bc_proxy.config import ServerSettings
from bc_proxy.errors import ConfigError


def server_context(server: ServerSettings) -> ssl.SSLContext | None:
    """The TLS context for these settings (None: plain HTTP); ConfigError when the files are
    unreadable, not PEM, or the key does not match the certificate."""
    if server.tls_cert_file is None or server.tls_key_file is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(server.tls_cert_file, server.tls_key_file)
    except OSError as exc:
        # FileNotFoundError / PermissionError name the file; ssl.SSLError (an OSError too)
        # means not PEM or a key that does not match the certificate.
        if isinstance(exc, ssl.SSLError):
            reason = f"not a valid certificate and key pair ({exc.reason or exc})"
        else:
            reason = f"cannot read {exc.filename or 'file'}: {exc.strerror or exc}"
        raise ConfigError(f"server.tls_cert_file/tls_key_file: {reason}") from None
    return ctx
