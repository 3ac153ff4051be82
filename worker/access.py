"""Who may connect to an export: client addresses, validated and normalized.

Pure and shared by the message contract and the settings: every address that reaches an
authfile has been through `normalize_client_addresses`, which accepts IPv4/IPv6 addresses
and CIDR networks only, in one canonical spelling each, so that two spellings of the same
list compare equal and nothing but digits, hex letters, `.`, `:` and `/` is ever written.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

MAX_CLIENT_ADDRESSES = 16
#: Who may connect to an export when neither its job nor the settings say: copy tools on
#: this appliance, or behind an SSH tunnel to it.
DEFAULT_CLIENT_ADDRESSES = ("127.0.0.1", "::1")
#: The longest canonical form is an IPv6 network: 39 characters plus "/128".
MAX_ADDRESS_LENGTH = 43
#: Before any parsing: what a numeric address or network may contain at all.
ADDRESS_PATTERN = r"^[0-9A-Fa-f.:/]{1,43}$"
_ADDRESS_RE = re.compile(ADDRESS_PATTERN)
#: IPv4 addresses embedded in IPv6 (::ffff:a.b.c.d): written as the IPv4 they are.
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: object) -> Network:
    """One address or network. Raises ValueError saying what is wrong with it."""
    if not isinstance(text, str):
        # ValueError, not TypeError: pydantic turns only ValueError into invalid_request.
        raise ValueError(f"a client address must be a string, not {type(text).__name__}")  # noqa: TRY004
    if "%" in text:
        raise ValueError(f"{text[:60]!r}: zone ids (%...) are not allowed")
    if not _ADDRESS_RE.fullmatch(text):
        raise ValueError(
            f"{text[:60]!r} is not a numeric IPv4/IPv6 address or CIDR network "
            "(hostnames are not allowed)"
        )
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        # strict: "10.0.0.5/24" is ambiguous (one host, or the /24?): the sender must say.
        raise ValueError(f"{text!r}: {exc}") from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        network = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def canonical(network: Network) -> str:
    """A host as its bare address, a network as address/prefix; IPv6 compressed."""
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def normalize_client_addresses(values: Iterable[object]) -> tuple[str, ...]:
    """1 to 16 addresses or networks: canonical, duplicates dropped, sorted (IPv4 first),
    so the same set always reads the same. Raises ValueError."""
    items = list(values)
    if not 1 <= len(items) <= MAX_CLIENT_ADDRESSES:
        raise ValueError(f"give 1 to {MAX_CLIENT_ADDRESSES} client addresses, not {len(items)}")
    networks = {parse_network(item) for item in items}
    ordered = sorted(networks, key=lambda n: (n.version, n.network_address, n.prefixlen))
    return tuple(canonical(n) for n in ordered)


def authfile_line(address: str) -> str:
    """`address` as an authfile line, always with its prefix length: nbd-server 3.26.1 takes
    a bare address's length from the *client's* family, so a bare IPv4 entry never matches
    a client that a dual-stack socket sees as ::ffff:a.b.c.d (nbdsrv.c address_matches)."""
    network = parse_network(address)
    return f"{network.network_address}/{network.prefixlen}"


def admits(addresses: Iterable[str], address: str) -> bool:
    """Whether one of `addresses` (canonical) covers the host `address`, also as nbd-server
    sees an IPv4 client on a dual-stack socket: as ::ffff:a.b.c.d, which IPv6 networks
    such as ::/0 cover."""
    host = parse_network(address)
    forms: list[Network] = [host]
    if isinstance(host, ipaddress.IPv4Network):
        forms.append(ipaddress.IPv6Network(f"::ffff:{host.network_address}/128"))
    return any(
        form.version == net.version and form.subnet_of(net)  # type: ignore[arg-type]
        for net in map(parse_network_raw, addresses)
        for form in forms
    )


def parse_network_raw(text: str) -> Network:
    """A canonical entry as the network it is, without mapping IPv4-in-IPv6 networks."""
    return ipaddress.ip_network(text, strict=True)


def all_loopback(addresses: Iterable[str]) -> bool:
    return all(parse_network(a).is_loopback for a in addresses)
