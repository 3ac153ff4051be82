"""The end every benchmark entry point of its own stack shares (bench/live.py,
bench/profile.py): run, keep the result as JSON, print it."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from harness.processes import StartFailed


def run_and_report(
    args: Any,
    run: Callable[[Any], Coroutine[Any, Any, dict[str, Any]]],
    render: Callable[[dict[str, Any]], str],
    result_file: str,
) -> int:
    """A benchmark entry point's end: runs `run(args)` against its own stack, keeps the
    result as JSON in `args.out` and prints it; 1 when the stack could not start."""
    args.out = args.out.resolve()
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    try:
        result = asyncio.run(run(args))
    except StartFailed as exc:
        print(f"the stack could not start: {exc}", file=sys.stderr)
        return 1
    (args.out / result_file).write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    return 0
