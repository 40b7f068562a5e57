"""The one exception tree of bc-proxy, translated to legacy answers at the edge (edge.py).

    BcProxyError
    ├── ConfigError          invalid configuration (CLI exits non-zero with the message)
    ├── LegacyError          an answer for the legacy client: status + one-line reason
    │   ├── BadRequest       400 (also: malformed encoding, upstream 400)
    │   ├── Unauthorized     401
    │   ├── Forbidden        403 (insufficient funds upstream)
    │   ├── PayloadTooLarge  413
    │   └── GatewayError     500 (upstream down/slow/5xx, our Connexus credentials refused)
    └── StoreError           the store could not do what was asked

Reasons are short, safe to show to a client, and never contain a secret.
"""

from __future__ import annotations


class BcProxyError(Exception):
    """Base of every error bc-proxy raises on purpose."""


class ConfigError(BcProxyError):
    """The configuration is invalid; the message names the offending key."""


class StoreError(BcProxyError):
    """The store failed (I/O, constraint, closed)."""


class LegacyError(BcProxyError):
    """An error answer for the legacy client."""

    status = 500

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadRequest(LegacyError):
    status = 400


class Unauthorized(LegacyError):
    status = 401


class Forbidden(LegacyError):
    status = 403


class PayloadTooLarge(LegacyError):
    status = 413


class GatewayError(LegacyError):
    status = 500
