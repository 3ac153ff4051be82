"""Fuzzing the message edge: whatever arrives, the worker either accepts a request whose
every field is safe to put in a file name, a config file and a link, or refuses it with a
readable reason, and never raises anything else."""

from __future__ import annotations

import ipaddress
import posixpath
import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from pydantic import ValidationError

from tests.strategies import MESSAGE_BODIES
from worker.access import normalize_client_addresses
from worker.devices import volume_links
from worker.messages import (
    DEVICE_PATH_PATTERN,
    ErrorCode,
    PrepareExport,
    parse_request,
    salvage_job_id,
)
from worker.nbd.authfiles import render_authfile
from worker.nbd.files import ExportSpec, render_snippet, snippet_path
from worker.replies import MAX_ERROR_MESSAGE, describe_validation_error, error_reply

EXPORT_NAME = re.compile(r"migration-vm-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}-disk\d{1,3}")
CONF_DIR = Path("/etc/nbd-server/conf.d")
LINK_DIR = Path("/var/lib/nbd-export-worker/links")
BY_ID = Path("/dev/disk/by-id")
#: What an authfile line may be: an address with its prefix length, nothing else.
AUTHFILE_ENTRY = re.compile(r"[0-9a-f.:]{2,39}/\d{1,3}")


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MESSAGE_BODIES)
def test_every_message_is_accepted_safely_or_refused_with_a_reason(body: bytes) -> None:
    try:
        request = parse_request(body)
    except ValidationError as exc:
        reason = describe_validation_error(exc)
        assert reason
        job_id = salvage_job_id(body)
        reply = error_reply(
            ErrorCode.INVALID_REQUEST, f"invalid request: {reason}", job_id=job_id, node_id="n"
        )
        assert len(reply.error.message) <= MAX_ERROR_MESSAGE
        reply.model_dump_json()  # always serializable
        return
    name = request.export_name
    assert EXPORT_NAME.fullmatch(name)
    assert snippet_path(CONF_DIR, name).parent == CONF_DIR
    assert (LINK_DIR / name).parent == LINK_DIR
    snippet = render_snippet(ExportSpec(name, LINK_DIR / name))
    assert [line for line in snippet.splitlines() if not line.startswith("#")] == [
        f"[{name}]",
        f"exportname = {LINK_DIR / name}",
        "flush = true",
        "fua = true",
        "trim = true",
    ]
    if isinstance(request, PrepareExport):
        if request.device_path is not None:
            assert re.fullmatch(DEVICE_PATH_PATTERN, request.device_path)
            assert posixpath.normpath(request.device_path) == request.device_path
            assert ".." not in request.device_path.split("/")
        else:
            assert request.volume_id is not None
            for link in volume_links(BY_ID, request.volume_id):
                assert Path(link).parent == BY_ID
        assert request.vm_name.isprintable()
        if request.client_addresses is not None:
            assert 1 <= len(request.client_addresses) <= 16
            # Canonical: normalizing again changes nothing.
            assert normalize_client_addresses(request.client_addresses) == (
                request.client_addresses
            )
            door = render_authfile(name, request.client_addresses).decode()
            entries = [line for line in door.splitlines() if not line.startswith("#")]
            assert len(entries) == len(request.client_addresses)
            for entry in entries:
                assert AUTHFILE_ENTRY.fullmatch(entry), entry
                ipaddress.ip_network(entry)  # what nbd-server's getaddrinfo reads
