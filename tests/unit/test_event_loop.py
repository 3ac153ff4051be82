"""EXPORT_WORKER_EVENT_LOOP: uvloop when installed (auto) or asked for, asyncio's own loop
when told or when uvloop is absent; asking for uvloop without it is one clear error."""

from __future__ import annotations

import asyncio
import builtins
import subprocess
import sys
from typing import Any

import pytest

from worker.cli import event_loop_runner


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]


def test_each_choice_runs_on_its_loop() -> None:
    assert event_loop_runner("auto")(loop_module()) == "uvloop"  # the set-up installs it
    assert event_loop_runner("uvloop")(loop_module()) == "uvloop"
    assert event_loop_runner("asyncio")(loop_module()) == "asyncio"


def test_without_uvloop_auto_is_asyncio_and_uvloop_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_import = builtins.__import__

    def no_uvloop(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "uvloop":
            raise ImportError("No module named 'uvloop'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    monkeypatch.delitem(sys.modules, "uvloop", raising=False)
    assert event_loop_runner("auto")(loop_module()) == "asyncio"
    with pytest.raises(ImportError, match=r"nbd-export-worker\[fast\]"):
        event_loop_runner("uvloop")


def test_the_command_line_refuses_uvloop_when_it_is_absent() -> None:
    """A usage error (exit 2) that says what to install, before anything runs."""
    code = (
        "import sys; sys.modules['uvloop'] = None; "
        "from worker.cli import main; sys.exit(main(['status']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={"EXPORT_WORKER_EVENT_LOOP": "uvloop", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "uvloop is not installed" in proc.stderr
