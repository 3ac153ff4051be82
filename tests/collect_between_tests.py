"""Frees each test's cyclic garbage at the end of its teardown, and at the end of a failed
test before pytest reports it, so that no finalizer runs inside someone else's `ast.parse`.

Why: CPython 3.11 before 3.11.8 keeps the AST converter's recursion depth in shared state
(gh-106905). When the cyclic collector frees an object while `ast.parse` builds a tree, a
finalizer may run there; asyncio's "Future exception was never retrieved" logs a traceback,
3.11's traceback carets parse the source line with `ast`, and the outer parse fails with
`SystemError: AST constructor recursion depth mismatch`. A leaked aio-pika future from a
cluster test failed `tests/unit/test_layout.py` that way in a CI run, and pytest's own
failure report (which parses with `ast`) has crashed the same way. Reproduced in isolation:
a cycle whose `__del__` logs an exception, collected during `ast.parse`, fails every time.

`gc.freeze()` after collection keeps these collections cheap: the modules and fixtures that
live for the whole session are not scanned again.
"""

from __future__ import annotations

import gc
from collections.abc import Generator

import pytest


def pytest_collection_finish(session: pytest.Session) -> None:
    gc.collect()
    gc.freeze()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    except BaseException:
        gc.collect()  # before the failure is reported (pytest parses its source with ast)
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    finally:
        gc.collect()
