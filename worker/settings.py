"""Settings: the only reader of the environment (prefix EXPORT_WORKER_).

Built once by the CLI and passed down; nothing else calls os.environ. The secrets in them
(the broker URLs' and the database URL's passwords) are kept as pydantic keeps secrets:
`repr`, `str` and `model_dump` of the settings never show them.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import parse_qs, urlsplit, urlunsplit

from pydantic import AnyUrl, Field, SecretStr, field_validator, model_validator
from pydantic_core import core_schema
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.access import DEFAULT_CLIENT_ADDRESSES, normalize_client_addresses
from worker.faults import CrashPoint
from worker.tls import TlsFiles
from worker.topology import node_routing_key

#: A routing-key word: no `*`, `#` or spaces; dots allowed (they only split words).
NODE_ID_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$"


def mask_url(url: str) -> str:
    """Returns `url` with any password replaced by `***`, for logs and `check`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class SecretUrl(AnyUrl):
    """A URL whose password is a secret, as SecretStr keeps one: its repr and its
    serialized form (model_dump, JSON) show the password as `***`. `str()` and `.password`
    still give it, which connecting needs: an AnyUrl for every caller."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({mask_url(str(self))!r})"

    @classmethod
    def serialize_url(cls, url: Any, info: core_schema.SerializationInfo) -> str:
        return mask_url(str(url))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EXPORT_WORKER_", frozen=True, extra="ignore")

    #: This appliance's name: its mappings, job records, metrics and replies carry it, and
    #: schedulers address it by routing key `prepare-export.<node_id>`. Unset: the one in
    #: `<state_dir>/node-id`, which the first `run` fills with the host name
    #: (worker/node_identity.py), so that it never drifts.
    node_id: str = Field(default_factory=socket.gethostname, pattern=NODE_ID_PATTERN)
    #: The worker's own state: the node id it chose on its first start.
    state_dir: Path = Path("/var/lib/nbd-export-worker")

    # --- RabbitMQ ---
    #: One URL, or several separated by commas (the nodes of a RabbitMQ cluster): the
    #: worker connects to the first that answers and fails over to the next.
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    #: Durable topic exchange schedulers publish to, routing by node.
    exchange: str = "nbd.exports"
    #: Durable queue the schedulers publish prepare-export jobs to (the worker declares it).
    request_queue: str = "nbd.prepare-export"
    #: Where replies go when a job carries no reply_to.
    reply_queue: str = "nbd.export-ready"
    #: How many jobs run at once; reuse jobs are cheap, creates queue up on the reload lock.
    prefetch: int = Field(default=16, ge=1, le=1000)
    #: Deliveries a job may be returned after (quorum queue x-delivery-limit): a job still
    #: failing transiently on its last delivery gets a retries_exhausted reply and goes,
    #: intact, to `<request_queue>.dead`.
    delivery_limit: int = Field(default=5, ge=1, le=1000)
    #: Tries of a job within one delivery on a transient failure (database, probe timeout,
    #: server down), with exponential backoff plus jitter between them: by default waits of
    #: 0.5, 1, 2 and 4 s (each plus up to 0.5 s), at least 7.5 s a delivery; with
    #: delivery_limit 5 (six deliveries) a job outlasts at least 45 s of outage, plus the
    #: time its tries take (connect and probe timeouts), before its retries_exhausted reply.
    job_attempts: int = Field(default=5, ge=1, le=100)
    retry_backoff_s: float = Field(default=0.5, gt=0)
    retry_backoff_max_s: float = Field(default=10.0, gt=0)
    #: How long each job's record (its reply, for redeliveries) is kept.
    job_record_retention_s: float = Field(default=7 * 86400.0, gt=0)
    #: How long a reply may wait for the broker's publisher confirm.
    publish_timeout_s: float = Field(default=10.0, gt=0)
    #: How long a reply (or any publish) that was nacked or not confirmed is published again
    #: on fresh channels before the job goes back to the queue: longer than a quorum
    #: queue's leader election (~0.2 s; several seconds on a loaded cluster).
    publish_retry_s: float = Field(default=30.0, ge=0)
    #: How long connecting to one broker URL may take before the next is tried.
    amqp_connect_timeout_s: float = Field(default=5.0, gt=0)

    # --- MariaDB / MySQL ---
    database_url: SecretUrl = SecretUrl("mysql://root@127.0.0.1:3306/nbd_exports")
    #: Every database connection over TLS, verifying the server's certificate (and name)
    #: against database_tls_ca; a server that offers no TLS is refused before any
    #: credential is sent, and each session is checked to be encrypted.
    database_tls: bool = False
    database_tls_ca: Path | None = None
    #: A client certificate and key, for servers that require one (REQUIRE X509).
    database_tls_cert: Path | None = None
    database_tls_key: Path | None = None
    #: Connections to the database; each job in flight holds one for a lookup at a time.
    db_pool_size: int = Field(default=16, ge=1, le=100)
    #: How long connecting to the database may take (the broker's: amqp_connect_timeout_s).
    db_connect_timeout_s: float = Field(default=5.0, gt=0)

    # --- nbd-server ---
    #: nbd-server's `includedir`: the worker writes one `<export>.conf` snippet per export here.
    nbd_conf_dir: Path = Path("/etc/nbd-server/conf.d")
    #: Pins the main config file: the server must run with `-C` this path. Default: the one
    #: on the main process's own command line, whose `includedir` must be nbd_conf_dir.
    nbd_config_file: Path | None = None
    #: Written by `nbd-server -p`; the only way the worker finds the main process.
    nbd_pid_file: Path = Path("/run/nbd-server.pid")
    #: Where the worker probes the server.
    nbd_host: str = "127.0.0.1"
    #: The host replies tell clients to connect to (default: nbd_host).
    nbd_advertise_host: str = ""
    nbd_port: int = Field(default=10809, ge=1, le=65535)
    #: TLS only: every export the worker creates gets `force_tls = true`, and every probe
    #: does STARTTLS with the client certificate below, verifying the server's against
    #: nbd_tls_ca (nbd-server always requires a client certificate). Replies say `tls`.
    nbd_tls: bool = False
    nbd_tls_ca: Path | None = None
    nbd_tls_cert: Path | None = None
    nbd_tls_key: Path | None = None
    #: The name (or address) the server's certificate must carry; default: nbd_host.
    nbd_tls_server_name: str = ""
    #: How long the reuse path trusts that the server answers (one shared NBD_OPT_GO
    #: confirms it again; a new server pid is noticed at once).
    answer_ttl_s: float = Field(default=2.0, ge=0)
    #: Behave like the original system (a probe process per job, one SIGHUP per create,
    #: nothing shared), for the benchmark's comparison only.
    baseline: bool = False
    #: The baseline's listing probe (`nbd-client -l`); Debian 12's nbd-client is fine.
    nbd_client_bin: str = "nbd-client"
    #: A probe that has not answered by then is abandoned (`nbd-client -l` is killed: it
    #: has no timeout of its own).
    probe_timeout_s: float = Field(default=5.0, gt=0)
    #: How long to wait, after a SIGHUP, for the server to know the new exports (a reload is
    #: asynchronous).
    reload_timeout_s: float = Field(default=10.0, gt=0)
    #: The lease of a prepare-export that names no lease_s: the export expires unless renewed
    #: within it (0: no lease, the exports stay until released).
    lease_s: int = Field(default=0, ge=0, le=7 * 24 * 3600)
    #: How often each node looks for its exports whose lease ran out (at most this late).
    expiry_check_s: float = Field(default=2.0, gt=0, le=10)
    #: How long before a lease ends its `expiring` event is published.
    expiry_notice_s: float = Field(default=60.0, ge=0, le=86400)
    #: How long an expired export's open connections may go on (fenced: nobody new) before
    #: they are cut.
    expiry_grace_s: float = Field(default=30.0, ge=0, le=86400)
    #: checksum-exports hashing at once; more wait their turn (each reads its whole device:
    #: one at a time leaves the disks' bandwidth to the copies).
    checksum_concurrency: int = Field(default=1, ge=1, le=64)
    #: How often the live view samples the server's connections (inspect-export, status,
    #: events, per-export metrics); 0 turns sampling off (inspect-export then samples once
    #: when asked, and no events are published). Costs about 0.1 ms a connection a sample.
    live_sample_s: float = Field(default=1.0, ge=0, le=3600)
    #: Pause between probes while waiting for new exports (each one a short connection).
    reload_poll_interval_s: float = Field(default=0.005, gt=0)
    #: How long a create may wait for the config lock before giving up (retryable).
    lock_timeout_s: float = Field(default=60.0, gt=0)
    #: Each export's `exportname` is a symlink here, so a device change is an atomic re-point.
    link_dir: Path = Path("/var/lib/nbd-export-worker/links")
    #: What each export offers a copy tool; nbd-server's defaults are all off. FLUSH lets a
    #: copy tool make its copy durable (`nbdcopy --flush`, as virt-v2v runs it, fails
    #: without); FUA lets it make single writes durable; TRIM lets a thin volume get back
    #: the space of zero runs. Exports already loaded keep what they had until a restart.
    export_flush: bool = True
    export_fua: bool = True
    export_trim: bool = True
    #: Who may connect to an export whose job gives no client_addresses: addresses or CIDR
    #: networks, comma-separated. The default suits copy tools on this appliance or behind
    #: an SSH tunnel to it (every copy then arrives from loopback).
    client_addresses: Annotated[tuple[str, ...], NoDecode] = DEFAULT_CLIENT_ADDRESSES
    #: The local address the worker's probes connect from, which every authfile admits
    #: too. Empty: the one the kernel picks to reach nbd_host (127.0.0.1 on loopback). Set a
    #: loopback address of its own (e.g. 127.0.0.2) so that exports whose jobs admit remote
    #: copy tools only do not admit local processes connecting from 127.0.0.1.
    probe_source_address: str = ""
    #: One authfile per export here (`<export>.allow`): the addresses it admits, read by
    #: nbd-server on every connection. A missing one would admit everyone.
    auth_dir: Path = Path("/var/lib/nbd-export-worker/auth")
    #: Use an nbd-server that failed the data-path self-test anyway (it would corrupt or
    #: lose copies; a warning is logged on every start). Never on an appliance in use.
    accept_failed_self_test: bool = False
    #: The data-path self-test (a private instance of the server's binary) must end by then.
    self_test_timeout_s: float = Field(default=30.0, gt=0)

    # --- Devices ---
    #: A device path must resolve under one of these prefixes.
    device_roots: Annotated[tuple[Path, ...], NoDecode] = (Path("/dev"),)
    #: Regular files as disks: for development and tests only.
    allow_regular_files: bool = False
    #: Where a job's volume_id is looked up (it must be under a device root).
    by_id_dir: Path = Path("/dev/disk/by-id")
    #: How long a job waits for udev to link a just-attached volume.
    udev_wait_s: float = Field(default=5.0, ge=0)

    # --- Metrics ---
    #: 0 turns the metrics endpoint off.
    metrics_port: int = Field(default=9108, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"  # noqa: S104 - Prometheus scrapes from another host

    #: Stop waiting for in-flight jobs this long after SIGTERM; the rest are requeued.
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    #: How often gauges (active mappings, known exports, server pid) are refreshed.
    housekeeping_interval_s: float = Field(default=15.0, gt=0)
    #: Reconcile mappings, snippets, links and the server this often; 0 turns it off.
    reconcile_interval_s: float = Field(default=300.0, ge=0)
    #: Reconcile once at start-up, before taking jobs.
    reconcile_on_start: bool = True

    #: Fault injection for the fault suite only: kill -9 this worker at the named step of
    #: a create. Never set it on an appliance.
    crash_at: CrashPoint | None = None

    # --- Logs ---
    #: "text" (human-readable) or "json" (one object per line).
    log_format: Literal["text", "json"] = "text"
    #: The event loop: uvloop when it is installed (the `fast` extra), else asyncio's own.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @property
    def amqp_urls(self) -> list[str]:
        """The broker URLs, passwords included: for connecting, never for logs."""
        urls = self.amqp_url.get_secret_value()
        return [url.strip() for url in urls.split(",") if url.strip()]

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """pydantic's, which does not validate `update`: the secrets in it are wrapped here,
        so that a copy keeps them secret too."""
        if update:
            update = dict(update)
            if isinstance(update.get("amqp_url"), str):
                update["amqp_url"] = SecretStr(update["amqp_url"])
            url = update.get("database_url")
            if url is not None and not isinstance(url, SecretUrl):
                update["database_url"] = SecretUrl(str(url))
        return super().model_copy(update=update, deep=deep)

    @property
    def nbd_tls_files(self) -> TlsFiles | None:
        if not self.nbd_tls or self.nbd_tls_ca is None:  # the validator requires the CA
            return None
        return TlsFiles(self.nbd_tls_ca, self.nbd_tls_cert, self.nbd_tls_key)

    @property
    def database_tls_files(self) -> TlsFiles | None:
        if not self.database_tls or self.database_tls_ca is None:
            return None
        return TlsFiles(self.database_tls_ca, self.database_tls_cert, self.database_tls_key)

    @model_validator(mode="after")
    def _tls_complete(self) -> Settings:
        # Impossible to half-enable: a TLS link with a missing piece is a settings error.
        if self.nbd_tls and None in (self.nbd_tls_ca, self.nbd_tls_cert, self.nbd_tls_key):
            raise ValueError(
                "nbd_tls needs nbd_tls_ca, nbd_tls_cert and nbd_tls_key (nbd-server requires "
                "a client certificate from every TLS client)"
            )
        # And none set while its link is off: that would be plaintext the operator did not
        # mean (a typo in EXPORT_WORKER_NBD_TLS, say).
        stray = [
            name
            for flag, names in (
                (
                    self.nbd_tls,
                    ("nbd_tls_ca", "nbd_tls_cert", "nbd_tls_key", "nbd_tls_server_name"),
                ),
                (self.database_tls, ("database_tls_ca", "database_tls_cert", "database_tls_key")),
            )
            if not flag
            for name in names
            if getattr(self, name)
        ]
        if stray:
            raise ValueError(
                f"{', '.join(stray)} set, but their link's TLS is off: set nbd_tls or "
                "database_tls to true, or remove them"
            )
        if self.nbd_tls and self.baseline:
            raise ValueError(
                "baseline lists exports with nbd-client -l, in plaintext: not with nbd_tls"
            )
        if self.database_tls and self.database_tls_ca is None:
            raise ValueError("database_tls needs database_tls_ca")
        if (self.database_tls_cert is None) != (self.database_tls_key is None):
            raise ValueError("database_tls_cert and database_tls_key go together")
        schemes = {urlsplit(url).scheme for url in self.amqp_urls}
        if not schemes <= {"amqp", "amqps"}:
            raise ValueError("amqp_url: every URL must be amqp:// or amqps://")
        if schemes == {"amqp", "amqps"}:
            raise ValueError("amqp_url mixes amqp:// and amqps://: a failover must never lose TLS")
        for url in self.amqp_urls:
            # Blank too: aiormq takes `?no_verify_ssl=` (or a bare one) as "do not verify".
            if "no_verify_ssl" in parse_qs(urlsplit(url).query, keep_blank_values=True):
                raise ValueError("amqp_url: no_verify_ssl is refused (the broker is verified)")
        return self

    @property
    def advertised_host(self) -> str:
        return self.nbd_advertise_host or self.nbd_host

    @property
    def routing_key(self) -> str:
        return node_routing_key("prepare-export", self.node_id)

    @field_validator("device_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return value

    @field_validator("client_addresses", mode="before")
    @classmethod
    def _split_addresses(cls, value: object) -> object:
        if isinstance(value, str):
            value = [a.strip() for a in value.split(",") if a.strip()]
        if isinstance(value, list | tuple):
            return normalize_client_addresses(value)
        return value

    @field_validator("probe_source_address")
    @classmethod
    def _host_address(cls, value: str) -> str:
        if not value:
            return value
        (address,) = normalize_client_addresses([value])
        if "/" in address:
            raise ValueError("probe_source_address must be one address, not a network")
        return address

    @field_validator("device_roots")
    @classmethod
    def _absolute_roots(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        if not value:
            raise ValueError("at least one device root is required")
        for root in value:
            if not root.is_absolute():
                raise ValueError(f"device root {root} is not absolute")
        return value

    @field_validator(
        "nbd_conf_dir",
        "nbd_config_file",
        "nbd_pid_file",
        "link_dir",
        "by_id_dir",
        "auth_dir",
        "state_dir",
        "nbd_tls_ca",
        "nbd_tls_cert",
        "nbd_tls_key",
        "database_tls_ca",
        "database_tls_cert",
        "database_tls_key",
    )
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        # nbd-server chdir()s to / when it daemonizes: relative paths would silently differ.
        if value is not None and not value.is_absolute():
            raise ValueError(f"{value} must be an absolute path")
        return value

    @field_validator("database_url")
    @classmethod
    def _mysql_url(cls, value: SecretUrl) -> SecretUrl:
        if value.scheme not in ("mysql", "mariadb"):
            raise ValueError("database_url must be mysql://user[:password]@host[:port]/database")
        return value

    @classmethod
    def unknown_variables(cls, environ: Mapping[str, str]) -> list[str]:
        """EXPORT_WORKER_* variables that name no setting: likely typos, which would
        otherwise leave a default (say, the device roots) silently in force."""
        known = {f"EXPORT_WORKER_{name.upper()}" for name in cls.model_fields}
        return sorted(k for k in environ if k.startswith("EXPORT_WORKER_") and k not in known)

    def masked(self) -> dict[str, object]:
        """The effective settings with secrets masked, for `check` and start-up logs: the
        broker URLs each shown with its password as `***` (SecretStr's own form hides them
        whole)."""
        data = self.model_dump(mode="json")
        data["amqp_url"] = ",".join(mask_url(url) for url in self.amqp_urls)
        return data
