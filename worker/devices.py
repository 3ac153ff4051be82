"""Which device paths a job may name: under an allowed root, also after resolving links,
existing, and a block device (regular files only when settings allow, for development)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from worker.errors import DeviceNotFound, InvalidRequest


@dataclass(frozen=True)
class DevicePolicy:
    roots: tuple[Path, ...]
    allow_regular_files: bool = False

    def _under_root(self, path: str) -> bool:
        return any(
            Path(path).is_relative_to(root) or Path(path).is_relative_to(root.resolve())
            for root in self.roots
        )

    def check(self, device_path: str) -> None:
        """Raises InvalidRequest or DeviceNotFound; `device_path` is already normalized.

        Checked before and after resolving links: /dev/disk/by-id names are links, and a
        link that leads outside the roots must not smuggle another file in.
        """
        if not self._under_root(device_path):
            raise InvalidRequest(f"device_path {device_path} is not under an allowed device root")
        try:
            resolved = os.path.realpath(device_path, strict=True)
            mode = os.stat(resolved).st_mode
        except FileNotFoundError:
            raise DeviceNotFound(f"device {device_path} does not exist") from None
        except OSError as exc:
            raise DeviceNotFound(f"device {device_path} is not accessible: {exc.strerror}") from exc
        if not self._under_root(resolved):
            raise InvalidRequest(f"device_path {device_path} resolves outside the allowed roots")
        if stat.S_ISBLK(mode):
            return
        if stat.S_ISREG(mode) and self.allow_regular_files:
            return
        raise InvalidRequest(f"device_path {device_path} is not a block device")


def device_present(device_path: str) -> bool:
    """Whether the device (or what its link points at) exists now: a local stat, no wait."""
    return os.path.exists(device_path)
