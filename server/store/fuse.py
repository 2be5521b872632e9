"""On Citus, a fuse per share of the pool: calls that need a worker found silent fail at once.

A worker that stops answering (a hung machine, a partition that drops packets) holds each
call that reaches it until a bound: Citus's connection timeout for a call that must connect
to it, the store's bound on an answer for one that has a connection (Unanswered). Bounded
by its share of the pool, such calls no longer take the pool from the other workers'
(StoreBase._take_node_slot), but each still waited out its slot or its bound, seconds each,
for as long as the worker stayed silent. A fuse is kept for each share (a worker's, keyed
by its node group, and the fan-outs', keyed None): FUSE_STRIKES calls that met the silence
with none answered between blow it; then the share's calls fail UNAVAILABLE at once for
FUSE_SECONDS, after which one call (the trial) goes through while the others still fail at
once. An answered trial closes the fuse; a silent one blows it again.

A refused connection (a crashed worker, which fails each call at once anyway), a statement
timeout (a slow statement or a lock wait on a healthy worker) and the caller's deadline
are neither silence nor an answer: they leave a fuse as it was (a trial that ends so is
tried again after FUSE_SECONDS).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

#: Calls meeting a worker's silence, with none answered between, that blow its fuse.
FUSE_STRIKES = 2
#: Seconds a blown fuse fails its share's calls at once before one call tries again.
FUSE_SECONDS = 2.0


class Admission(enum.Enum):
    """What a fuse lets a call do."""

    GO = "go"
    TRY = "try"  # the trial of a blown fuse
    REFUSE = "refuse"


class Outcome(enum.Enum):
    """How a call ended, as a fuse reads it."""

    ANSWERED = "answered"
    SILENT = "silent"
    NEITHER = "neither"


@dataclass
class Fuse:
    """One share's fuse; `now` is time.monotonic()'s."""

    strikes: int = 0
    blown_until: float = -math.inf
    trying: bool = False
    #: Calls refused at once since the process started (for the metric).
    refused: int = 0

    @property
    def blown(self) -> bool:
        """Whether the share's calls are refused but for a trial."""
        return self.strikes >= FUSE_STRIKES

    def refusing(self, now: float) -> bool:
        """Whether the share's calls are failed at once now: blown, its trial not yet due
        or running. A blown fuse whose share has no call (no trial) stops refusing after
        FUSE_SECONDS, so a read that takes no share (GetMemory's of the memories) never
        skips a worker on a fuse gone stale."""
        return self.blown and (self.trying or now < self.blown_until)

    def admit(self, now: float) -> Admission:
        """Whether a call may go: always while the fuse holds; once blown, the first call
        after FUSE_SECONDS goes as the trial, the others are refused."""
        if not self.blown:
            return Admission.GO
        if self.trying or now < self.blown_until:
            self.refused += 1
            return Admission.REFUSE
        self.trying = True
        return Admission.TRY

    def ended(self, outcome: Outcome, now: float, *, trial: bool) -> None:
        """Takes in how a call the fuse admitted ended (`trial`: as its trial)."""
        if trial:
            self.trying = False
        if outcome is Outcome.ANSWERED:
            self.strikes = 0
        elif outcome is Outcome.SILENT:
            self.strikes += 1
            if self.blown:
                self.blown_until = now + FUSE_SECONDS
        elif trial:
            self.blown_until = now + FUSE_SECONDS  # not proven either way: try again later


@dataclass(frozen=True)
class ShareState:
    """What the metrics show of one share of the pool (StoreBase.share_states): its node
    group (None: the fan-outs'), the calls holding and waiting for its slots, whether its
    fuse is blown and how many calls the fuse has refused."""

    node_group: int | None
    in_flight: int
    waiting: int
    blown: bool
    refused: int
