"""Database TLS that fails closed.

aiomysql (0.3.2, connection.py `_request_authentication`) asked for TLS with `ssl=` still
logs in in plaintext when the server's handshake does not offer TLS: it sends the
handshake response, user name and password hash included, unencrypted, and the session
carries every row in clear. So the login step is wrapped, once, to refuse first: a
connection that asked for TLS to a server that does not offer it raises before anything
is sent. After login each session is asked whether it really is encrypted (`Ssl_cipher`),
which a proxy that terminates TLS in front of a plaintext link cannot fake to us either.
"""

from __future__ import annotations

from typing import Any

import pymysql
from aiomysql.connection import Connection
from pymysql.constants import CLIENT

#: CR_SSL_CONNECTION_ERROR: the client's own code for a failed TLS set-up.
CR_SSL_CONNECTION_ERROR = 2026

_login = Connection._request_authentication


async def _login_over_tls_only(self: Any) -> None:
    if self._ssl_context is not None and not self.server_capabilities & CLIENT.SSL:
        raise pymysql.err.OperationalError(
            CR_SSL_CONNECTION_ERROR,
            f"TLS is required but the database server at {self._host}:{self._port} offers "
            "none: refusing to log in in plaintext",
        )
    await _login(self)
    if self._ssl_context is not None and not self._secure:
        raise pymysql.err.OperationalError(
            CR_SSL_CONNECTION_ERROR, f"the session with {self._host}:{self._port} is not encrypted"
        )


def refuse_plaintext_logins() -> None:
    """Installs the check (idempotent). Connections made without `ssl=` are unchanged."""
    Connection._request_authentication = _login_over_tls_only


async def session_cipher(conn: Any) -> str:
    """The session's TLS cipher as the server sees it ('' when in plaintext)."""
    async with conn.cursor() as cur:
        await cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        row = await cur.fetchone()
    return str(row[1]) if row else ""
