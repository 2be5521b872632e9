"""The reliability knobs of `memstore serve`: flags, environment variables, defaults."""

from __future__ import annotations

import argparse

import pytest

from server import config


def _parse(*argv: str) -> config.Config:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return config.from_arguments(parser.parse_args(argv))


def test_defaults_bound_every_statement_and_drain_for_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("MEMSTORE_STATEMENT_TIMEOUT", "MEMSTORE_DRAIN_DELAY"):
        monkeypatch.delenv(name, raising=False)
    parsed = _parse()
    assert parsed.statement_timeout == 30.0
    assert parsed.drain_delay == 1.0


def test_recall_waits_five_seconds_at_most_unless_told_and_never_a_negative_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GetMemory's bound on the memories' read on Citus (docs/scaling.md, "Recall with a
    # worker lost").
    monkeypatch.delenv("MEMSTORE_RECALL_TIMEOUT", raising=False)
    assert _parse().recall_timeout == 5.0
    assert _parse("--recall-timeout", "0").recall_timeout == 0.0  # no bound of its own
    monkeypatch.setenv("MEMSTORE_RECALL_TIMEOUT", "1.5")
    assert _parse().recall_timeout == 1.5
    assert _parse("--recall-timeout", "2").recall_timeout == 2.0
    for bad in ("-1", "nan", "1e300", "soon"):
        with pytest.raises(SystemExit):
            _parse("--recall-timeout", bad)


def test_environment_sets_them_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMSTORE_STATEMENT_TIMEOUT", "0")
    monkeypatch.setenv("MEMSTORE_DRAIN_DELAY", "2.5")
    assert _parse().statement_timeout == 0.0  # 0 turns the timeout off
    assert _parse().drain_delay == 2.5
    assert _parse("--drain-delay", "0", "--statement-timeout", "5").drain_delay == 0.0
    assert _parse("--statement-timeout", "5").statement_timeout == 5.0
