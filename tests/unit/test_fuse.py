"""The fuse of a share of the pool (server/store/fuse.py): when it blows, when it tries, when
it closes."""

from __future__ import annotations

import pytest

from server.store.fuse import FUSE_SECONDS, FUSE_STRIKES, Admission, Fuse, Outcome

pytestmark = pytest.mark.unit


def _blown(now: float = 0.0) -> Fuse:
    fuse = Fuse()
    for _ in range(FUSE_STRIKES):
        assert fuse.admit(now) is Admission.GO
        fuse.ended(Outcome.SILENT, now, trial=False)
    assert fuse.blown
    return fuse


def test_one_silent_call_does_not_blow_it() -> None:
    # A connection frozen alone (tests/store/test_unanswered.py) must not fail the next call.
    fuse = Fuse()
    fuse.ended(Outcome.SILENT, 0.0, trial=False)
    assert fuse.admit(0.0) is Admission.GO


def test_an_answer_between_two_silent_calls_keeps_it() -> None:
    fuse = Fuse()
    fuse.ended(Outcome.SILENT, 0.0, trial=False)
    fuse.ended(Outcome.ANSWERED, 0.1, trial=False)
    fuse.ended(Outcome.SILENT, 0.2, trial=False)
    assert not fuse.blown and fuse.admit(0.2) is Admission.GO


def test_neither_silence_nor_an_answer_leaves_the_strikes() -> None:
    # A refused connection, a statement timeout, a deadline: nothing said of silence.
    fuse = Fuse()
    fuse.ended(Outcome.SILENT, 0.0, trial=False)
    fuse.ended(Outcome.NEITHER, 0.1, trial=False)
    assert not fuse.blown
    fuse.ended(Outcome.SILENT, 0.2, trial=False)
    assert fuse.blown


def test_blown_it_refuses_then_lets_one_trial_through() -> None:
    fuse = _blown(0.0)
    assert fuse.admit(FUSE_SECONDS - 0.01) is Admission.REFUSE
    assert fuse.admit(FUSE_SECONDS) is Admission.TRY
    # The others wait for the trial's end.
    assert fuse.admit(FUSE_SECONDS + 0.5) is Admission.REFUSE
    # Each refusal counted (memstore_citus_share_refused), the trial not.
    assert fuse.refused == 2


def test_an_answered_trial_closes_it() -> None:
    fuse = _blown(0.0)
    assert fuse.admit(FUSE_SECONDS) is Admission.TRY
    fuse.ended(Outcome.ANSWERED, FUSE_SECONDS + 0.1, trial=True)
    assert not fuse.blown and fuse.admit(FUSE_SECONDS + 0.1) is Admission.GO


def test_a_silent_trial_blows_it_again() -> None:
    fuse = _blown(0.0)
    assert fuse.admit(FUSE_SECONDS) is Admission.TRY
    fuse.ended(Outcome.SILENT, 3.0, trial=True)
    assert fuse.admit(3.0 + FUSE_SECONDS - 0.01) is Admission.REFUSE
    assert fuse.admit(3.0 + FUSE_SECONDS) is Admission.TRY


def test_a_trial_that_proves_nothing_is_tried_again_later() -> None:
    fuse = _blown(0.0)
    assert fuse.admit(FUSE_SECONDS) is Admission.TRY
    fuse.ended(Outcome.NEITHER, 3.0, trial=True)
    assert fuse.blown
    assert fuse.admit(3.0 + FUSE_SECONDS - 0.01) is Admission.REFUSE
    assert fuse.admit(3.0 + FUSE_SECONDS) is Admission.TRY


def test_a_call_begun_before_it_blew_and_answered_closes_it() -> None:
    # The worker answered: whichever call saw it.
    fuse = _blown(0.0)
    fuse.ended(Outcome.ANSWERED, 0.5, trial=False)
    assert fuse.admit(0.5) is Admission.GO


def test_it_refuses_while_blown_until_its_trial_is_due_and_while_it_runs() -> None:
    # What a read that takes no share asks (GetMemory's of the memories on Citus): it skips
    # the worker only while the fuse refuses, never on a fuse left blown with no trial.
    fuse = Fuse()
    assert not fuse.refusing(0.0)
    fuse = _blown(0.0)
    assert fuse.refusing(FUSE_SECONDS - 0.01)
    assert not fuse.refusing(FUSE_SECONDS)  # a trial is due: stale for a read
    assert fuse.admit(FUSE_SECONDS) is Admission.TRY
    assert fuse.refusing(FUSE_SECONDS + 5.0)  # the trial runs
    fuse.ended(Outcome.ANSWERED, FUSE_SECONDS + 5.0, trial=True)
    assert not fuse.refusing(FUSE_SECONDS + 5.0)
