"""The settings keep their secrets: no repr, str or dump of them shows a password, copies
included, while the worker still connects with them (and a worker process gets them)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import AnyUrl

from harness.worker_process import env_for
from worker.settings import SecretUrl, Settings

DB_PASSWORD = "Db-pw-never-shown"
AMQP_PASSWORD = "Mq-pw-never-shown"
DB_URL = f"mysql://exporter:{DB_PASSWORD}@db.example:3307/nbd"
AMQP_URLS = f"amqp://a:{AMQP_PASSWORD}@mq1.example/,amqp://b:{AMQP_PASSWORD}2@mq2.example/"


def shown(settings: Settings) -> str:
    return "\n".join(
        [
            repr(settings),
            str(settings),
            repr(settings.model_dump()),
            str(settings.model_dump()),
            settings.model_dump_json(),
            json.dumps(settings.model_dump(mode="json")),
            json.dumps(settings.masked()),
            repr(settings.database_url),
            str(settings.amqp_url),
        ]
    )


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("EXPORT_WORKER_DATABASE_URL", DB_URL)
    monkeypatch.setenv("EXPORT_WORKER_AMQP_URL", AMQP_URLS)
    return Settings()


def test_no_form_of_the_settings_shows_a_password(settings: Settings) -> None:
    text = shown(settings)
    assert DB_PASSWORD not in text
    assert AMQP_PASSWORD not in text
    assert "db.example" in text  # the database URL is still there, its password masked
    assert "exporter:***@db.example" in json.dumps(settings.masked())
    assert "a:***@mq1.example" in json.dumps(settings.masked())


def test_the_worker_still_connects_with_them(settings: Settings) -> None:
    assert isinstance(settings.database_url, AnyUrl)
    assert settings.database_url.password == DB_PASSWORD
    assert str(settings.database_url) == DB_URL
    assert settings.amqp_urls[0] == f"amqp://a:{AMQP_PASSWORD}@mq1.example/"


def test_built_in_code_they_are_secret_too() -> None:
    # As harness.worker_process.worker_settings and the fixtures build them: plain values.
    fields: dict[str, Any] = {
        "database_url": AnyUrl(DB_URL),
        "amqp_url": f"amqp://a:{AMQP_PASSWORD}@h/",
    }
    settings = Settings(**fields)
    assert isinstance(settings.database_url, SecretUrl)
    assert DB_PASSWORD not in shown(settings)
    assert AMQP_PASSWORD not in shown(settings)


def test_a_copy_with_new_secrets_keeps_them_secret() -> None:
    """model_copy does not validate its update: the settings wrap the secrets themselves."""
    copy = Settings().model_copy(
        update={"database_url": AnyUrl(DB_URL), "amqp_url": f"amqp://a:{AMQP_PASSWORD}@h/"}
    )
    assert DB_PASSWORD not in shown(copy)
    assert AMQP_PASSWORD not in shown(copy)
    assert copy.database_url.password == DB_PASSWORD
    assert copy.amqp_urls == [f"amqp://a:{AMQP_PASSWORD}@h/"]


def test_a_worker_process_gets_them_whole(settings: Settings) -> None:
    env = env_for(settings)
    assert env["EXPORT_WORKER_DATABASE_URL"] == DB_URL
    assert env["EXPORT_WORKER_AMQP_URL"] == AMQP_URLS
