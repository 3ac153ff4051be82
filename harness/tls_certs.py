"""A test PKI made with openssl: a CA, a server certificate for 127.0.0.1 and a client
certificate, in the layout libnbd (`tls-certificates=DIR`) and QEMU (`tls-creds-x509`)
read: ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca-cert.pem"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server-cert.pem"

    @property
    def server_key(self) -> Path:
        return self.dir / "server-key.pem"

    @property
    def client_cert(self) -> Path:
        return self.dir / "client-cert.pem"

    @property
    def client_key(self) -> Path:
        return self.dir / "client-key.pem"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(directory: Path, name: str, subject: str, extensions: str, ca_dir: Path) -> None:
    ext = directory / f"{name}.ext"
    ext.write_text(extensions)
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem",
        "-out", f"{name}.csr", "-subj", subject, cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", str(ca_dir / "ca-cert.pem"),
        "-CAkey", str(ca_dir / "ca-key.pem"), "-CAcreateserial", "-days", "2",
        "-out", f"{name}-cert.pem", "-extfile", str(ext), cwd=directory,
    )  # fmt: skip


def make_pki(directory: Path, *, server_names: str = "IP:127.0.0.1,DNS:localhost") -> Pki:
    """A CA and its server and client certificates under `directory`; the server's
    certificate names `server_names` (subjectAltName)."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem",
        "-out", "ca-cert.pem", "-days", "2", "-subj", f"/CN=test CA {directory.name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory,
    )  # fmt: skip
    _issue(
        directory,
        "server",
        "/CN=127.0.0.1",
        f"subjectAltName={server_names}\nextendedKeyUsage=serverAuth\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n",
        directory,
    )
    _issue(
        directory,
        "client",
        "/CN=copy tool",
        "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n",
        directory,
    )
    for key in directory.glob("*-key.pem"):
        key.chmod(0o600)
    return Pki(directory)
