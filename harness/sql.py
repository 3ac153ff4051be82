"""One SQL statement on a fresh connection: for tests and the benchmark, which set up and
inspect databases beside the worker's own pool."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiomysql
from pydantic import AnyUrl


async def execute_sql(
    url: AnyUrl, sql: str, params: Sequence[Any] | None = None
) -> list[tuple[Any, ...]]:
    """Runs `sql` on `url`'s database (none if it names none) as the URL's user (root by
    default); returns its rows."""
    conn = await aiomysql.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 3306,
        user=url.username or "root",
        password=url.password or "",
        db=(url.path or "").lstrip("/") or None,
        autocommit=True,
        charset="utf8mb4",
    )
    try:
        async with conn.cursor() as cur:
            await cur.execute(sql, params)
            return list(await cur.fetchall())
    finally:
        conn.close()
