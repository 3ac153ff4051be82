"""Hypothesis strategies for hostile prepare-export / release-export messages."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

VALID_VM = "4205784a-098a-40f1-1f1e-a5cd2597fd59"

#: Text an attacker or a broken scheduler might send: config-file syntax, path tricks,
#: control characters, shell characters, very long strings.
NASTY_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "..",
            "../../etc/passwd",
            "/dev/../etc/shadow",
            "/dev/vdb]\n[evil]\nexportname = /etc/shadow",
            "/dev/vdb\x00",
            "/dev//vdb",
            "/dev/./vdb",
            "x=1",
            "]",
            "[",
            "$(reboot)",
            "`id`",
            "; rm -rf /",
            "\u202e",
            "\r\n",
            "/" + "a" * 5000,
            VALID_VM,
            VALID_VM.upper() + "\n",
            "/dev/vdb",
            "/dev/disk/by-id/virtio-0a1b2c3d4e5f6a7b8c9d",
        ]
    ),
)

FIELD_VALUES = st.one_of(
    NASTY_TEXT,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)

#: Client addresses: real ones (any spelling), networks, and what must never reach a file.
ADDRESS_TEXT = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses().map(lambda a: a.exploded),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
    st.builds(lambda a, n: f"{a}/{n}", st.ip_addresses().map(str), st.integers(-1, 130)),
    st.sampled_from(
        [
            "127.0.0.1\n0.0.0.0/0",
            "10.0.0.1 #",
            "[::1]",
            "fe80::1%eth0",
            "localhost",
            "0x7f.1",
            "127.1",
            "::1/",
            "/8",
            "1.2.3.4/08",
            " 10.0.0.1",
            "::ffff:0:0/96",
            "0.0.0.0/0",
        ]
    ),
    NASTY_TEXT,
)
CLIENT_ADDRESSES = st.one_of(
    st.lists(ADDRESS_TEXT, min_size=0, max_size=20),
    st.lists(st.one_of(ADDRESS_TEXT, st.integers(), st.none(), st.lists(st.text())), max_size=4),
    FIELD_VALUES,
)

FIELDS = [
    "type",
    "job_id",
    "vm_id",
    "vm_name",
    "disk_unit_number",
    "device_path",
    "volume_id",
    "client_addresses",
]


@st.composite
def request_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """A request whose fields are each valid, missing or hostile."""
    base: dict[str, Any] = {
        "job_id": draw(st.from_regex(r"\Afuzz-[a-z0-9]{1,12}\Z")),
        "vm_id": VALID_VM,
        "vm_name": "vm",
        "disk_unit_number": draw(st.integers(0, 3)),
        "device_path": "/dev/vdb",
    }
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        if field == "client_addresses":
            base[field] = draw(CLIENT_ADDRESSES)
        elif draw(st.booleans()):
            base[field] = draw(FIELD_VALUES)
        else:
            base.pop(field, None)
    return base


def _encode(value: dict[str, Any]) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


#: Whole message bodies: hostile JSON requests, arbitrary bytes, non-UTF-8, oversized.
MESSAGE_BODIES = st.one_of(
    request_dicts().map(_encode),
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.just(b'{"job_id": "' + b"x" * 70_000 + b'"}'),
    request_dicts().map(lambda d: _encode(d).replace(b'"', b"\xff", 1)),
)
