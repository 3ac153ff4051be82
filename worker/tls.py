"""TLS for the worker's own links (nbd-server probes, the database), failing closed.

Every context verifies the peer's certificate against the configured CA and its name
(hostname or IP address), and speaks TLS 1.2 or newer. A link configured for TLS never
falls back to plaintext: the callers refuse instead (wire.py for NBD, repository.py for
the database; aio-pika does it for amqps:// URLs).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from worker.errors import WorkerError


class TlsConfigError(WorkerError):
    """The configured CA, certificate or key cannot be used (missing, unreadable, wrong)."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA that signs the peer, and this side's certificate and key."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def client_context(self, link: str) -> ssl.SSLContext:
        """A client context for `link` (named in errors). Raises TlsConfigError."""
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
            if self.cert is not None:
                context.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"{link} TLS: cannot load {self._names()}: {exc}") from exc
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # create_default_context() checks names and chains already; said again so that no
        # later edit here can turn it off without this line changing.
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _names(self) -> str:
        files = [f"CA {self.ca}"]
        if self.cert is not None:
            files.append(f"certificate {self.cert}")
        if self.key is not None:
            files.append(f"key {self.key}")
        return ", ".join(files)
