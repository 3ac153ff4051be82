"""TLS on every link, failing closed: NBD (nbds://) first.

The tests make their own CA and certificates (tests/tls_certs.py, openssl) and judge the
NBD side with real clients: nbdcopy and nbdinfo over nbds://, qemu-img with
tls-creds-x509.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.nbd_harness import server_binary
from tests.tls_certs import Pki, make_pki
from worker.nbd.tls_selftest import ServerTlsFiles, run_tls_close_test
from worker.nbd.wire import NbdTls
from worker.tls import TlsFiles

UNPATCHED_BIN = Path("/var/cache/nbd-export-worker/nbd-server-unpatched/nbd-server")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def _client(pki: Pki) -> NbdTls:
    files = TlsFiles(pki.ca, pki.client_cert, pki.client_key)
    return NbdTls(files.client_context("NBD"), "127.0.0.1")


def _server_files(pki: Pki) -> ServerTlsFiles:
    return ServerTlsFiles(pki.server_cert, pki.server_key, pki.ca)


@pytest.mark.parametrize(
    ("binary", "spins"),
    [(server_binary(), False), (str(UNPATCHED_BIN), True)],
    ids=["ours", "debian"],
)
async def test_tls_close_self_test_tells_a_spinning_build(
    pki: Pki, binary: str, spins: bool
) -> None:
    assert Path(binary).exists(), "run scripts/install-system-deps.sh --with-test-tools"
    verdict = await run_tls_close_test(binary, _server_files(pki), _client(pki))
    assert verdict.ok is not spins, verdict.failures
    if spins:
        assert "spun at" in verdict.failures[0]
