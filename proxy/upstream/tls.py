"""The TLS context the upstream client and the /version polls verify https backends with
(and present for mTLS)."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from proxy.core.errors import ConfigError

if TYPE_CHECKING:
    from proxy.config.settings import UpstreamConfig


def client_tls_context(config: UpstreamConfig) -> ssl.SSLContext:
    """The system's CAs, or ``upstream.ca_file``; plus the client certificate if set.

    Raises ``ConfigError`` naming the setting when a file is not usable PEM, so a bad
    certificate stops the start rather than every https request.
    """
    try:
        context = ssl.create_default_context(
            cafile=str(config.ca_file) if config.ca_file is not None else None
        )
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"upstream.ca_file: not a usable CA bundle: {exc}") from exc
    if config.client_cert_file is not None:
        key = str(config.client_key_file) if config.client_key_file is not None else None
        try:
            context.load_cert_chain(str(config.client_cert_file), key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"upstream.client_cert_file: not a usable certificate and key: {exc}"
            ) from exc
    return context


def check_tls_files(config: UpstreamConfig) -> None:
    """Build the TLS context once if TLS files are configured, so a bad PEM is a start-up error.

    Raises ``ConfigError`` naming the setting (``upstream.ca_file: ...``).
    """
    if config.ca_file is not None or config.client_cert_file is not None:
        client_tls_context(config)
