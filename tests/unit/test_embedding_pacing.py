"""The embedding worker's pacing: requests first, the model keeps to a share while they run."""

from __future__ import annotations

import time

import pytest

from server.search.worker import BUSY_SHARE, Pacer


def _burn_cpu(seconds: float) -> None:
    # CPU time, not wall time: the process's clock must advance whatever the machine's load.
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_a_batch_is_followed_by_a_pause_that_keeps_the_model_to_its_share() -> None:
    pacer = Pacer(share=BUSY_SHARE)
    # Model time over model time plus pause is the share.
    batch = 0.37
    pause = pacer.pause_after(batch)
    assert batch / (batch + pause) == pytest.approx(BUSY_SHARE)
    assert Pacer(share=1.0).pause_after(batch) == 0


def test_the_request_path_is_busy_when_the_rest_of_the_process_uses_cpu() -> None:
    pacer = Pacer(busy_cores=1e-6)
    _burn_cpu(0.02)
    assert pacer.busy()  # this thread stands for the request path here


def test_the_models_own_cpu_does_not_make_the_request_path_busy() -> None:
    pacer = Pacer(busy_cores=1e-6)
    _burn_cpu(0.02)
    pacer.model_ran(60.0)  # far more than the process used: all of it was the model's
    assert not pacer.busy()
    # Each look starts a new window: what the model used before is not counted again.
    _burn_cpu(0.02)
    assert pacer.busy()
