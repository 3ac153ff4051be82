"""Reconciliation: make the server, the snippets, the links and the authfiles agree with
the mappings.

Mappings are the truth. Every export the server may know has an authfile: an active one's
admits its client addresses, any other's (released, or a snippet nobody maps) nobody; a
missing, unreadable or wrong one is rewritten first, since a missing one admits everyone.
Missing or wrong links and snippets are rewritten (also snippets with outdated options)
and the missing exports added with one SIGHUP; files of inactive mappings are removed (a
stale link would let a new connection open a released device). What only a restart or an
operator can fix is reported, never guessed at: snippets nobody maps, exports stuck in the
server's memory, exports served without FLUSH, and exports that ignore their authfile
(both loaded before their snippet asked for it).

The server is never asked to list its exports (it may refuse: `allowlist = false`): each
name is asked with NBD_OPT_GO, once per server pid for names it knows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from worker.devices import device_present
from worker.errors import WorkerError
from worker.mappings import Mapping
from worker.nbd.authfiles import AuthfileState, safe_export_name
from worker.nbd.files import has_snippet, link_target, list_snippet_names, snippet_outdated
from worker.nbd.server import NbdServer
from worker.repository import Repository

log = logging.getLogger(__name__)

#: Only exports whose names this worker gives are ours to judge.
EXPORT_PREFIX = "migration-vm-"


@dataclass
class ReconcileReport:
    dry_run: bool
    active: int = 0
    links_rewritten: list[str] = field(default_factory=list)
    snippets_rewritten: list[str] = field(default_factory=list)
    exports_added: list[str] = field(default_factory=list)
    released_cleaned: list[str] = field(default_factory=list)
    devices_missing: list[str] = field(default_factory=list)
    orphan_snippets: list[str] = field(default_factory=list)
    stuck_exports: list[str] = field(default_factory=list)
    #: Active exports the running server serves without FLUSH although their snippet asks
    #: for it: `nbdcopy --flush` fails on them until nbd-server restarts.
    exports_without_flush: list[str] = field(default_factory=list)
    #: Authfiles missing, unreadable or wrong (name: what was found), for every export
    #: the server may know: rewritten (in a dry run, to be).
    authfiles_repaired: dict[str, str] = field(default_factory=dict)
    #: Active exports that open from an address their authfile does not admit: loaded
    #: without an `authfile` line, they admit everyone until nbd-server restarts.
    unprotected_exports: list[str] = field(default_factory=list)
    #: With NBD TLS on: active exports that plain clients can still open (loaded before
    #: `force_tls`; a restart of nbd-server fixes them).
    plaintext_exports: list[str] = field(default_factory=list)
    #: Why the server cannot read the authfiles at all (then it admits everyone).
    auth_dir_problem: str | None = None
    sighup_sent: bool = False

    def drift(self) -> dict[str, int]:
        """Counts by kind, for the drift gauge and the summary."""
        return {
            "link": len(self.links_rewritten),
            "snippet": len(self.snippets_rewritten),
            "not_listed": len(self.exports_added),
            "released_files": len(self.released_cleaned),
            "device_missing": len(self.devices_missing),
            "orphan_snippet": len(self.orphan_snippets),
            "stuck_export": len(self.stuck_exports),
            "no_flush": len(self.exports_without_flush),
            "authfile": len(self.authfiles_repaired),
            "unprotected": len(self.unprotected_exports),
            "plaintext": len(self.plaintext_exports),
            "auth_dir": int(self.auth_dir_problem is not None),
        }

    def lines(self) -> list[str]:
        """A human summary: what was done (or, in a dry run, what would be)."""
        done = not self.dry_run
        out = [f"active mappings: {self.active}"]
        if self.auth_dir_problem:
            out.append(f"AUTHFILES UNREADABLE BY THE SERVER: {self.auth_dir_problem}")
        authfiles = [f"{name} ({found})" for name, found in self.authfiles_repaired.items()]
        for label, names in (
            ("authfiles rewritten" if done else "authfiles to rewrite", authfiles),
            ("links rewritten" if done else "links to rewrite", self.links_rewritten),
            ("snippets rewritten" if done else "snippets to rewrite", self.snippets_rewritten),
            ("exports added" if done else "exports to add", self.exports_added),
            (
                "released exports' files removed" if done else "released exports' files to remove",
                self.released_cleaned,
            ),
            ("devices missing (new connections will fail)", self.devices_missing),
            ("snippets without a mapping (left alone)", self.orphan_snippets),
            ("exports stuck in the server's memory (a restart clears them)", self.stuck_exports),
            (
                "exports served without FLUSH (loaded before; a restart of nbd-server fixes)",
                self.exports_without_flush,
            ),
            (
                "UNPROTECTED exports: they admit everyone (loaded before they had an authfile; "
                "a restart of nbd-server fixes)",
                self.unprotected_exports,
            ),
            (
                "PLAINTEXT exports: TLS is on, but they serve plain clients too (loaded "
                "before force_tls; a restart of nbd-server fixes)",
                self.plaintext_exports,
            ),
        ):
            out.append(f"{label}: {len(names)}")
            out.extend(f"  {name}" for name in names)
        out.append(f"SIGHUP sent: {'yes' if self.sighup_sent else 'no'}")
        return out


async def hold_devices(server: NbdServer, mappings: list[Mapping]) -> None:
    """Opens and keeps the devices of active exports (so that a later flush sees writeback
    errors from now on) and lets go of released ones'."""
    for mapping in mappings:
        if mapping.is_active:
            await server.hold_device(mapping.export_name, mapping.device_path, mapping.device_id)
        else:
            server.let_go(mapping.export_name)


async def reconcile(
    repository: Repository, server: NbdServer, *, dry_run: bool, thorough: bool = False
) -> ReconcileReport:
    """One pass. `thorough` also asks the server about every released name, to report the
    stuck ones (a connection each: for the operator's commands); otherwise only released
    names already known to be loaded, or with files left, are reported."""
    report = ReconcileReport(dry_run=dry_run)
    # Each repair below re-reads its row under the config lock, from this repository.
    server.bind_committed(repository.committed_export)
    mappings = await repository.list_mappings()
    if not dry_run:
        # First, whatever the server's state: after a restart, as early as can be.
        await hold_devices(server, mappings)
    conf_dir = server.conf_dir
    active = {m.export_name: m for m in mappings if m.is_active}
    released = sorted(m.export_name for m in mappings if not m.is_active)
    mapped = {m.export_name for m in mappings}
    report.active = len(active)
    report.orphan_snippets = sorted(list_snippet_names(conf_dir, EXPORT_PREFIX) - mapped)
    odd = [name for name in report.orphan_snippets if not safe_export_name(name)]
    if odd:
        # Not a name the worker gives: reported, never used to name a file.
        log.error("Snippets with names the worker never gives names=%r", odd)

    # Authfiles before anything that needs the server: they are the door.
    admitted: dict[str, tuple[str, ...]] = {}
    corrupt: list[str] = []
    fenced = [name for name, mapping in active.items() if mapping.fenced]
    for name, mapping in sorted(active.items()):
        if mapping.fenced:
            continue  # a drain or an expiry under way: nobody may connect
        try:
            admitted[name] = mapping.admitted()
        except ValueError as exc:
            # Never guess who may connect: nobody, until a job names its clients again.
            log.error("Mapping of %s has invalid client_addresses: %s", name, exc)  # noqa: TRY400
            corrupt.append(name)
    doors: dict[str, tuple[str, ...] | None] = dict.fromkeys(
        name
        for name in released + report.orphan_snippets + corrupt + fenced
        if safe_export_name(name)
    )
    doors.update(admitted)
    for name, addresses in doors.items():
        state = server.authfile_state(name, addresses)
        if state is not AuthfileState.OK:
            found = "invalid client_addresses" if name in corrupt else state.value
            report.authfiles_repaired[name] = found
    if report.authfiles_repaired:
        log.warning(
            "Authfiles missing, unreadable or wrong dry_run=%s exports=%s",
            dry_run,
            ",".join(f"{n}:{s}" for n, s in report.authfiles_repaired.items()),
        )
    # What is still wrong after this pass's repairs (all of it, in a dry run).
    still_wrong = set(report.authfiles_repaired)
    if not dry_run:
        for name in report.authfiles_repaired:
            try:
                # Re-read under the config lock: a job may have changed the row since.
                await server.repair_authfile(name)
                still_wrong.discard(name)
            except WorkerError as exc:  # the others are still worth repairing
                log.error("Cannot rewrite the authfile of %s: %s", name, exc)  # noqa: TRY400

    await server.ping()  # the server answers, or nothing below can be judged
    asked_at = time.monotonic()
    report.auth_dir_problem = server.auth_dir_problem()
    if report.auth_dir_problem:
        log.error("%s", report.auth_dir_problem)
    asked = set(active) | {
        name
        for name in released + report.orphan_snippets
        if safe_export_name(name)
        and (thorough or has_snippet(conf_dir, name) or server.spec(name).link_path.is_symlink())
    }
    known = await server.known_names(asked) | server.remembered_names()

    wanted: dict[str, str] = {}
    for name, mapping in sorted(active.items()):
        spec = server.spec(name)
        if link_target(spec.link_path) != mapping.device_path:
            report.links_rewritten.append(name)
            wanted[name] = mapping.device_path
        if not has_snippet(conf_dir, name) or snippet_outdated(conf_dir, spec):
            # An outdated one is rewritten so that a restart brings its new options.
            report.snippets_rewritten.append(name)
            wanted[name] = mapping.device_path
        if name not in known:
            report.exports_added.append(name)
            wanted[name] = mapping.device_path
        if not device_present(mapping.device_path):
            report.devices_missing.append(name)

    for name in released:
        spec = server.spec(name)
        if has_snippet(conf_dir, name) or spec.link_path.is_symlink():
            report.released_cleaned.append(name)

    report.stuck_exports = sorted(
        n for n in known if n.startswith(EXPORT_PREFIX) and n not in active
    )
    loaded = sorted(n for n in active if n in known)
    if server.options.flush:
        # Asked once per export and server pid (a reload never changes a loaded export).
        flags = await server.data_path_flags(loaded)
        report.exports_without_flush = [
            name for name, found in flags.items() if found is not None and not found.can_flush
        ]
    # Only exports whose authfile is right now: one that is missing admits everyone anyway,
    # which says nothing about what the server loaded.
    doors_right = {n: admitted[n] for n in loaded if n in admitted and n not in still_wrong}
    # Exports that just opened for known_names need only the canary's probe.
    verdicts = await server.unprotected(doors_right, opened_since=asked_at)
    report.unprotected_exports = [name for name, bad in verdicts.items() if bad]
    if report.unprotected_exports:
        log.error(
            "Exports admit everyone: loaded before they had an authfile; restart nbd-server "
            "exports=%s",
            ",".join(report.unprotected_exports),
        )

    if server.tls:
        plain = await server.plaintext_open(loaded)
        report.plaintext_exports = [name for name, opens in plain.items() if opens]
        if report.plaintext_exports:
            log.error(
                "Exports serve plain clients although NBD TLS is on: loaded before force_tls; "
                "restart nbd-server exports=%s",
                ",".join(report.plaintext_exports),
            )

    if not dry_run:
        # Each action re-reads its row under the config lock: a job may have changed the
        # mapping since the snapshot above, and the job's view wins.
        for name in report.released_cleaned:
            await server.remove_export(name)
        if wanted:
            ensured = await server.ensure_exports(wanted)
            report.sighup_sent = ensured.sighup_sent
            await hold_devices(server, [active[name] for name in wanted])  # links now right
    if any(report.drift().values()):
        log.warning("Reconciliation found drift %s dry_run=%s", report.drift(), dry_run)
    return report
