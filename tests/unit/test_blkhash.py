"""worker/blkhash.py gives ovirt-imageio's checksum: compared with ovirt-imageio's own
blkhash.checksum (its 2.5.1 package, a dev dependency) and with the few lines
docs/contract.md gives schedulers, on files with data, zero runs, holes and a short tail."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from ovirt_imageio._internal import blkhash as imageio_blkhash
from pydantic import ValidationError

from worker.blkhash import hash_fd
from worker.messages import CHECKSUM_ALGORITHMS, parse_request

MiB = 1024**2


def _contract_checksum(path: Path, block_size: int, algorithm: str) -> str:
    """The source side as docs/contract.md tells schedulers to compute it."""
    kwargs: dict[str, Any] = {"digest_size": 32} if algorithm.startswith("blake2") else {}
    func = getattr(hashlib, algorithm)
    outer = func(**kwargs)
    with path.open("rb") as f:
        while block := f.read(block_size):
            outer.update(func(block, **kwargs).digest())
    return str(outer.hexdigest())


def _image(path: Path, size: int) -> Path:
    """Holes, a data run, a written zero run, data across a block edge, a short tail."""
    rng = os.urandom
    with path.open("wb") as f:
        f.truncate(size)
        f.seek(5 * MiB + 123)
        f.write(rng(3 * MiB))
        f.seek(12 * MiB)
        f.write(bytes(9 * MiB))  # written zeros: found by zero detection, not SEEK_DATA
        f.seek(size - 3000)
        f.write(rng(100))
    return path


def _hash(path: Path, block_size: int, algorithm: str) -> tuple[str, int, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        result = hash_fd(fd, block_size=block_size, algorithm=algorithm, on_block=lambda d, n: None)
    finally:
        os.close(fd)
    return result.checksum, result.size, result.zero_bytes


@pytest.mark.parametrize(
    ("algorithm", "block_size", "size"),
    [
        ("blake2b", 4 * MiB, 40 * MiB),
        ("blake2b", 4 * MiB, 40 * MiB + 4096 + 512),  # a short last block
        ("blake2b", 1 * MiB, 33 * MiB),
        ("sha256", 16 * MiB, 50 * MiB),
        ("blake2s", 2 * MiB, 30 * MiB),
        ("sha1", 4 * MiB, 24 * MiB),
    ],
)
def test_equals_ovirt_imageio(tmp_path: Path, algorithm: str, block_size: int, size: int) -> None:
    path = _image(tmp_path / "disk.img", size)
    expected = imageio_blkhash.checksum(
        str(path),
        block_size=block_size,
        algorithm=algorithm,
        digest_size=32 if algorithm.startswith("blake2") else None,
    )
    checksum, hashed, _ = _hash(path, block_size, algorithm)
    assert {"algorithm": algorithm, "block_size": block_size, "checksum": checksum} == expected
    assert checksum == _contract_checksum(path, block_size, algorithm)
    assert hashed == size


def test_one_changed_byte_changes_it(tmp_path: Path) -> None:
    path = _image(tmp_path / "disk.img", 20 * MiB)
    before, _, _ = _hash(path, 4 * MiB, "blake2b")
    with path.open("r+b") as f:
        f.seek(17 * MiB + 5)  # inside a hole
        f.write(b"\1")
    after, _, _ = _hash(path, 4 * MiB, "blake2b")
    assert after != before
    assert after == _contract_checksum(path, 4 * MiB, "blake2b")


def test_zero_bytes_counts_holes_and_zero_blocks(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(16 * MiB)
        f.seek(4 * MiB)
        f.write(os.urandom(10))  # block 1 has data
        f.seek(8 * MiB)
        f.write(bytes(4 * MiB))  # block 2 written, all zeros
    _, size, zero_bytes = _hash(path, 4 * MiB, "blake2b")
    assert (size, zero_bytes) == (16 * MiB, 12 * MiB)


def test_a_callback_that_raises_stops_the_hash(tmp_path: Path) -> None:
    path = _image(tmp_path / "disk.img", 20 * MiB)
    seen: list[int] = []

    class Stop(Exception):
        pass

    def on_block(done: int, length: int) -> None:
        seen.append(done)
        if done >= 8 * MiB:
            raise Stop

    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(Stop):
            hash_fd(fd, block_size=4 * MiB, algorithm="blake2b", on_block=on_block)
    finally:
        os.close(fd)
    assert seen == [4 * MiB, 8 * MiB]


def _job(**fields: object) -> bytes:
    return json.dumps(
        {
            "type": "checksum-export",
            "job_id": "job-1",
            "vm_id": "4205784A-098a-40f1-1f1e-a5cd2597fd59",
            "disk_unit_number": 0,
            **fields,
        }
    ).encode()


def test_checksum_export_defaults_are_ovirt_imageios() -> None:
    request = parse_request(_job())
    assert request.type == "checksum-export"
    assert (request.algorithm, request.block_size) == (
        imageio_blkhash.ALGORITHM,
        imageio_blkhash.BLOCK_SIZE,
    )
    assert set(CHECKSUM_ALGORITHMS) <= hashlib.algorithms_guaranteed


@pytest.mark.parametrize(
    "fields",
    [
        {"algorithm": "shake_128"},
        {"algorithm": "crc32"},
        {"block_size": 512 * 1024},  # below ovirt-imageio's quarter of 4 MiB
        {"block_size": 32 * MiB},
        {"block_size": 4 * MiB + 512},  # not aligned to 4096
        {"block_size": "4194304"},
    ],
)
def test_checksum_export_refuses_what_ovirt_imageio_does_not_support(
    fields: dict[str, object],
) -> None:
    with pytest.raises(ValidationError):
        parse_request(_job(**fields))
