"""The serving process's collector settings (docs/performance.md, "the collector tuned")."""

from __future__ import annotations

import gc

from server.serving import app


def test_serving_freezes_startup_objects_and_collects_the_young_less_often() -> None:
    threshold = gc.get_threshold()
    try:
        app._tune_collector()
        assert gc.get_threshold() == (app.GC_YOUNG_THRESHOLD, *threshold[1:])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
