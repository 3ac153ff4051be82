"""Which event loop `run` uses (settings.event_loop): uvloop when installed and not refused,
asyncio's own without it; asked for by name and missing, a clear error at start."""

from __future__ import annotations

import asyncio
import sys

import pytest

from worker.cli import event_loop_factory


def test_asyncio_is_asyncio_s_own_loop() -> None:
    assert event_loop_factory("asyncio") is None


def test_auto_is_uvloop_when_installed() -> None:
    import uvloop  # in the dev extras, as in the image (the `fast` extra)

    factory = event_loop_factory("auto")
    assert factory is uvloop.new_event_loop
    loop = factory()
    try:
        assert isinstance(loop, uvloop.Loop)
        assert loop.run_until_complete(asyncio.sleep(0, "ran")) == "ran"
    finally:
        loop.close()


def test_without_uvloop_auto_falls_back_and_uvloop_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert event_loop_factory("auto") is None
    with pytest.raises(ImportError):
        event_loop_factory("uvloop")
