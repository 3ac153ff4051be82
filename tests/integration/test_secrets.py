"""Secrets (the database password, the broker URL's credentials) never reach a log line or
a reply, even while connections fail and are retried."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection
from pydantic import AnyUrl

from harness.sql import execute_sql
from harness.tcp_proxy import TcpProxy
from harness.worker_process import WorkerProcess, env_for
from tests.conftest import AMQP_URL, Scheduler, clean_environ, job, make_disk, run_worker_cli
from worker.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
async def secret_user(database_url: AnyUrl) -> AsyncIterator[tuple[str, str]]:
    """A database user with a password, allowed on the test database only."""
    user, password = f"nbdsecret_{secrets.token_hex(4)}", f"Pw-{secrets.token_hex(12)}"
    db = (database_url.path or "/")[1:]
    await execute_sql(database_url, f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'")
    try:
        await execute_sql(database_url, f"GRANT ALL ON `{db}`.* TO '{user}'@'%'")
        yield user, password
    finally:
        await execute_sql(database_url, f"DROP USER IF EXISTS '{user}'@'%'")


async def test_passwords_never_appear_in_logs_or_replies(
    settings: Settings,
    secret_user: tuple[str, str],
    amqp: AbstractConnection,
    disks_dir: Path,
) -> None:
    user, password = secret_user
    db_proxy, amqp_proxy = TcpProxy("127.0.0.1", 3306), TcpProxy("127.0.0.1", 5672)
    db_port, amqp_port = await db_proxy.start(), await amqp_proxy.start()
    db = (settings.database_url.path or "/")[1:]
    amqp_password = f"amqp-{secrets.token_hex(8)}"
    secret_settings = settings.model_copy(
        update={
            "database_url": AnyUrl(f"mysql://{user}:{password}@127.0.0.1:{db_port}/{db}"),
            # A first broker whose credentials are wrong (its password must not leak
            # either), then the real one through the proxy.
            "amqp_url": f"amqp://nobody:{amqp_password}@127.0.0.1:1/,"
            + AMQP_URL.replace(":5672", f":{amqp_port}"),
            "log_level": "DEBUG",
            "db_connect_timeout_s": 1.0,
            "amqp_connect_timeout_s": 1.0,
            "delivery_limit": 1,
        }
    )
    worker = WorkerProcess(secret_settings)
    scheduler = Scheduler(await amqp.channel(), settings.request_queue)
    await scheduler.start()
    try:
        await worker.start()
        ok = await scheduler.request(job(device=make_disk(disks_dir, "s1")))
        # The database goes away: jobs fail, are retried, and end with an error reply.
        await db_proxy.stop()
        failed = await scheduler.request(job(device=make_disk(disks_dir, "s2")), timeout_s=60)
        await db_proxy.start()
        # The broker connection drops: the worker reconnects, logging its URLs.
        await amqp_proxy.stop()
        await asyncio.sleep(0.5)
        await amqp_proxy.start()
        again = await scheduler.request(job(device=make_disk(disks_dir, "s3")), timeout_s=60)
    finally:
        await worker.stop()
        await db_proxy.stop()
        await amqp_proxy.stop()
        await scheduler.channel.close()
    assert ok["status"] == again["status"] == "ready"
    assert failed["status"] == "error"
    assert failed["error"]["cause"] == "database_unavailable"
    env = env_for(secret_settings)
    commands = [run_worker_cli(c, env=env) for c in ("show-config", "check")]
    text = "".join(worker.log) + "".join(p.stdout + p.stderr for p in commands)
    text += "".join(str(r) for r in (ok, failed, again))
    assert "Retrying" in text  # the failures were logged
    for secret in (password, amqp_password, ":guest@"):
        assert secret not in text


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("EXPORT_WORKER_DATABASE_URL", "postgres://exporter:Pw-leaks-not@db.example/nbd"),
        ("EXPORT_WORKER_AMQP_URL", "amqps://exporter:Pw-leaks-not@mq.example/,amqp://b:c@x/"),
    ],
)
def test_invalid_settings_are_named_without_their_values(variable: str, value: str) -> None:
    """pydantic's own message repeats the input, a URL's password with it."""
    done = run_worker_cli("show-config", env=clean_environ(**{variable: value}))
    assert done.returncode == 2
    assert "invalid settings:" in done.stderr
    assert "Pw-leaks-not" not in done.stderr
