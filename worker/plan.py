"""What a prepare-export job needs: reuse what is in place, or claim the row and make the
export serve. One pure function, plan(), decides it from the job's mapping row, the job,
its device and the facts the flow found out; the flow only finds facts out and carries the
plan through.

plan() asks for the facts it needs, one at a time (an Ask), so that the flow finds out no
more than the decision needs: a create never probes the server to learn whether an export
it does not have is live, and the lock-free fast path stops as soon as the plan can no
longer be a plain reuse.

No I/O here; tests/unit/test_plan.py is its table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from worker.devices import Device
from worker.mappings import Mapping, stored_addresses
from worker.messages import Action, PrepareExport

#: Ends last_action once the claim's answer is settled (the first delivery of the job to
#: settle it wins: every other answers the same).
SETTLED_MARK = "!"
#: Ends last_action when the claim's answer says `reused` (the server had the export
#: loaded: no SIGHUP), e.g. "relinked+reused".
REUSED_MARK = "+reused"


class Fact(enum.StrEnum):
    """What plan() may ask the flow to find out (each names a Facts field)."""

    #: The mapping's export is live with its device (link, snippet, known to the server).
    LIVE = "live"
    #: The export's authfile admits exactly the job's clients.
    AUTHFILE_ADMITS = "authfile_admits"
    #: The server has the export loaded already: making it serve needs no SIGHUP.
    LOADED = "loaded"


@dataclass(frozen=True)
class Facts:
    """What the flow found out for plan(); None: not found out (yet)."""

    #: Who the job admits: its own client addresses, or the worker's default.
    clients: tuple[str, ...]
    live: bool | None = None
    authfile_admits: bool | None = None
    loaded: bool | None = None

    def learnt(self, fact: Fact, value: bool) -> Facts:
        # Not dataclasses.replace(): this runs on every reuse, and it costs 3x as much.
        live, admits, loaded = self.live, self.authfile_admits, self.loaded
        if fact is Fact.LIVE:
            live = value
        elif fact is Fact.AUTHFILE_ADMITS:
            admits = value
        else:
            loaded = value
        return Facts(self.clients, live, admits, loaded)


@dataclass(frozen=True)
class Ask:
    """plan() cannot go on without this fact: find it out and call plan() again."""

    fact: Fact


@dataclass(frozen=True)
class Answer:
    """What the job's reply says, and every redelivery of it repeats."""

    action: Action
    #: The server had the export loaded: no SIGHUP was (or will be) needed for this job.
    reused: bool

    @property
    def recorded(self) -> str:
        """As last_action keeps it with the claim."""
        return f"{self.action}{REUSED_MARK}" if self.reused else str(self.action)

    @classmethod
    def of_recorded(cls, last_action: str) -> Answer:
        """The answer a claim recorded; rows from before REUSED_MARK: not reused, as they
        were answered then."""
        recorded = last_action.removesuffix(SETTLED_MARK)
        action = recorded.removesuffix(REUSED_MARK)
        return cls(Action(action), reused=action != recorded)


#: A reuse's answer: the export was in place.
REUSE_ANSWER = Answer(Action.REUSED, reused=True)


class Repair(enum.Enum):
    """What a reuse must put right first (under the disk's lock), in this order."""

    #: A drain or an expiry fenced the export (it admits nobody): a prepare-export lifts
    #: it, before the authfile is written again from the row.
    UNFENCE = "unfence"
    #: A new prepare-export starts a new copy: an earlier flush failure no longer speaks
    #: for what will be written (a claim clears it the same way).
    CLEAR_FLUSH_ERROR = "clear-flush-error"
    #: The row admits other clients: the row first, it is what every authfile is written
    #: from.
    STORE_CLIENTS = "store-clients"
    #: The authfile admits other clients (or is missing): rewrite it from the row.
    ALIGN_AUTHFILE = "align-authfile"
    #: The job plans another number of bytes than the row (progress is measured by it).
    STORE_PLANNED_BYTES = "store-planned-bytes"


@dataclass(frozen=True)
class Reuse:
    """The export serves the job's device already: answer without claiming the row, no
    config edit, no SIGHUP."""

    #: The row's client_addresses for this job (as stored).
    clients: str
    repairs: frozenset[Repair] = frozenset()
    #: The row's generation: the reuse answers the next one.
    generation: int = 0
    #: The row has a lease or an idle timeout: the reuse sets them anew in the database
    #: before it answers (without, the next generation is written after the reply).
    leased: bool = False

    @property
    def plain(self) -> bool:
        """Nothing to put right: the lock-free fast path may answer it."""
        return not self.repairs

    @property
    def answer(self) -> Answer:
        return REUSE_ANSWER


@dataclass(frozen=True)
class Claim:
    """Claim the row for this job (its unique device index settles races with other jobs
    and workers), then make the export serve: a create, recreate or relink."""

    answer: Answer
    #: The row's client_addresses for this job (as stored).
    clients: str
    #: An earlier delivery of this very job claimed the row and was cut short: this one
    #: finishes its work and answers what that one settled.
    resumes: bool = False
    #: A relink's row as it was: put back if the export cannot be made, so that no row
    #: frees a device the export's link still opens.
    restore: Mapping | None = None


Plan = Reuse | Claim


def decide(mapping: Mapping | None, device_path: str, live: bool) -> Action:
    """What a job for `device_path` needs, given its (vm, disk)'s mapping and whether that
    export is live with the mapping's device."""
    if mapping is None or not mapping.is_active:
        return Action.CREATED
    if mapping.device_path != device_path:
        return Action.RELINKED
    return Action.REUSED if live else Action.RECREATED


def claimed_by(mapping: Mapping | None, job_id: str) -> bool:
    """Whether `job_id` made the mapping's current claim (an earlier delivery of it)."""
    return mapping is not None and mapping.is_active and mapping.last_job_id == job_id


def plan(
    mapping: Mapping | None, request: PrepareExport, device: Device, facts: Facts
) -> Plan | Ask:
    """What `request` needs, given its (vm, disk)'s mapping row (None: never prepared) as
    last read, its resolved `device`, and `facts`; or the next fact it must know first."""
    clients = stored_addresses(facts.clients)
    earlier = claimed_by(mapping, request.job_id)
    if earlier and mapping is not None and mapping.last_action:
        # Settled by the first delivery, before anything changed: the SIGHUP it needed
        # may be sent already, so every delivery of a job answers what it recorded.
        return Claim(Answer.of_recorded(mapping.last_action), clients, resumes=True)
    same_device = mapping is not None and mapping.is_active and mapping.device_path == device.path
    if same_device and facts.live is None:
        return Ask(Fact.LIVE)
    action = decide(mapping, device.path, live=bool(facts.live))
    if action is Action.REUSED and not earlier and mapping is not None:
        if facts.authfile_admits is None:
            return Ask(Fact.AUTHFILE_ADMITS)
        repairs = set()
        if mapping.fenced:
            repairs |= {Repair.UNFENCE, Repair.ALIGN_AUTHFILE}
        if mapping.flush_error is not None:
            repairs.add(Repair.CLEAR_FLUSH_ERROR)
        if mapping.client_addresses != clients:
            repairs.add(Repair.STORE_CLIENTS)
        if not facts.authfile_admits:
            repairs.add(Repair.ALIGN_AUTHFILE)
        if request.planned_bytes is not None and request.planned_bytes != mapping.planned_bytes:
            repairs.add(Repair.STORE_PLANNED_BYTES)
        leased = mapping.lease_s is not None or mapping.idle_timeout_s is not None
        return Reuse(clients, frozenset(repairs), mapping.generation, leased)
    # A claim: whether it will need a SIGHUP is its answer's `reused`, settled now, before
    # anything changes, and recorded with the claim.
    if facts.loaded is None:
        return Ask(Fact.LOADED)
    return Claim(
        Answer(action, reused=facts.loaded),
        clients,
        resumes=earlier,
        restore=mapping if action is Action.RELINKED and not earlier else None,
    )
