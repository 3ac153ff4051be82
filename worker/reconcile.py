"""Reconciliation: make the server, the snippets and the links agree with the mappings.

Active mappings are the truth. Missing or wrong links and snippets are rewritten (also
snippets with outdated data-path options) and the missing exports added with one SIGHUP;
files of inactive mappings are removed (a stale link would let a new connection open a
released device). What only a restart or an operator can fix is reported, never guessed
at: snippets nobody maps, exports stuck in the server's memory, and exports the server
serves without FLUSH (loaded before their snippet asked for it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from worker.devices import device_present
from worker.mappings import Mapping
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
        }

    def lines(self) -> list[str]:
        """A human summary: what was done (or, in a dry run, what would be)."""
        done = not self.dry_run
        out = [f"active mappings: {self.active}"]
        for label, names in (
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


async def reconcile(repository: Repository, server: NbdServer, *, dry_run: bool) -> ReconcileReport:
    report = ReconcileReport(dry_run=dry_run)
    mappings = await repository.list_mappings()
    if not dry_run:
        # First, whatever the server's state: after a restart, as early as can be.
        await hold_devices(server, mappings)
    listed = await server.listed_exports()
    conf_dir = server.conf_dir
    active = {m.export_name: m for m in mappings if m.is_active}
    report.active = len(active)

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
        if name not in listed:
            report.exports_added.append(name)
            wanted[name] = mapping.device_path
        if not device_present(mapping.device_path):
            report.devices_missing.append(name)

    released = [m.export_name for m in mappings if not m.is_active]
    for name in sorted(released):
        spec = server.spec(name)
        if has_snippet(conf_dir, name) or spec.link_path.is_symlink():
            report.released_cleaned.append(name)

    mapped = {m.export_name for m in mappings}
    report.orphan_snippets = sorted(list_snippet_names(conf_dir, EXPORT_PREFIX) - mapped)
    report.stuck_exports = sorted(
        n for n in listed if n.startswith(EXPORT_PREFIX) and n not in active
    )
    if server.options.flush:
        # Asked once per export and server pid (a reload never changes a loaded export).
        flags = await server.data_path_flags(sorted(n for n in active if n in listed))
        report.exports_without_flush = [
            name for name, found in flags.items() if found is not None and not found.can_flush
        ]

    if not dry_run:
        # Each action re-reads its row under the config lock: a job may have changed the
        # mapping since the snapshot above, and the job's view wins.
        for name in report.released_cleaned:
            await server.remove_export(name, repository.committed_device)
        if wanted:
            ensured = await server.ensure_exports(wanted, repository.committed_device)
            report.sighup_sent = ensured.sighup_sent
            await hold_devices(server, [active[name] for name in wanted])  # links now right
    if any(report.drift().values()):
        log.warning("Reconciliation found drift %s dry_run=%s", report.drift(), dry_run)
    return report
