"""The operator commands of `nbd-export-worker`, one small function each.

Each takes the settings (and its parsed arguments, when it has any) and returns an exit
code; worker/cli.py only parses the command line and picks one. They build what they use
through worker/assembly.py, as the service does.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    #: A runtime failure: a service unreachable, an error reply, a failed check or
    #: self-test, a failed flush.
    FAILURE = 1
    #: Bad usage or settings.
    USAGE = 2
    #: The nbd-server must not be used (too old, or it failed the data-path self-test).
    UNSUPPORTED_SERVER = 3
    #: `request` got no reply in time.
    TIMEOUT = 4
