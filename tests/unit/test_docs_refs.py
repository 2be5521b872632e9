"""The docs cite only what the repository holds: every linked or named file exists (a claim
names the test that proves it, so that test must be there), and the error table lists
each row once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Markdown links to local files, and repository paths named in text.
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
_PATH = re.compile(
    r"(?<![\w/.-])((?:tests|server|memstore_client|bench|docs|protos|scripts|examples)/"
    r"[\w./-]*\w\.(?:py|md|sql|proto|sh|js|json))\b"
)
_MD_NAME = re.compile(r"(?<![\w/.-])([A-Z][A-Z_]+\.md)\b")


def _cited(doc: Path) -> set[str]:
    text = doc.read_text(encoding="utf-8")
    found = {m for m in _LINK.findall(text) if "://" not in m and not m.startswith("mailto:")}
    found |= set(_PATH.findall(text))
    found |= set(_MD_NAME.findall(text))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_file_a_doc_cites_exists(doc: Path) -> None:
    missing = []
    for ref in sorted(_cited(doc)):
        here, top = doc.parent / ref, ROOT / ref
        if not (here.exists() or top.exists()):
            missing.append(ref)
    assert not missing, f"{doc.relative_to(ROOT)} cites files the repository lacks: {missing}"


def test_the_error_table_lists_each_row_once() -> None:
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    section = text.split("## Errors", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, "docs/design.md has an error table under ## Errors"
    keys = [tuple(cell.strip() for cell in row.split("|")[1:3]) for row in rows]
    assert len(keys) == len(set(keys)), [k for k in keys if keys.count(k) > 1]


def test_make_run_and_the_readme_say_how_to_turn_metrics_on() -> None:
    from server.config import Config
    from server.settings import declared

    env = next(d.setting.env for d in declared(Config) if d.name == "metrics_port")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    run_help = makefile.split("\nrun:", 1)[0].rsplit("\n\n", 1)[-1]
    assert f"{env}=" in run_help and "make run" in run_help, run_help
    # `make run` passes no flag that would override the variable.
    recipe = makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert "--metrics" not in recipe
    assert f"{env}=9464 make run" in (ROOT / "README.md").read_text(encoding="utf-8")


#: `tests/x.py::test_name` (a line break may follow the `::`), and test names in backticks.
_TEST_REF = re.compile(r"(tests/[\w/]+\.py)::\s*(\w+)")
_TEST_NAME = re.compile(r"`(test_\w+)`")


def _defined(path: Path) -> set[str]:
    return set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(encoding="utf-8"), re.M))


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_test_a_doc_names_exists(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    everywhere = set().union(*(_defined(p) for p in (ROOT / "tests").rglob("test_*.py")))
    missing = [
        f"{path}::{name}"
        for path, name in _TEST_REF.findall(text)
        if not (ROOT / path).exists() or name not in _defined(ROOT / path)
    ]
    missing += [name for name in _TEST_NAME.findall(text) if name not in everywhere]
    assert not missing, f"{doc.relative_to(ROOT)} names tests the repository lacks: {missing}"


#: Reasons only the `memstore` commands print (projects, keys; NOT_MIGRATED: purge, reindex,
#: projects and keys on a database lacking migrations; CITUS_WORKER: every command
#: that migrates or checks the migrations, through a Citus worker): no RPC returns them.
_CLI_REASONS = {
    "PROJECT_ALREADY_EXISTS",
    "PROJECT_NOT_FOUND",
    "API_KEY_NOT_FOUND",
    "NOT_MIGRATED",
    "CITUS_WORKER",
}
#: An explicit ErrorInfo reason in the server's code: `reason="X"`, `reason = "...", "X"`
#: (rest/routing.py), `_REASON = "X"` (api/tokens.py) or a JSON body's `"reason": "X"`.
_RAISED = re.compile(
    r"""(?:\breason\s*=\s*(?:"[^"]*",\s*)?|_REASON\s*=\s*|"reason":\s*)"([A-Z][A-Z_]{3,})\""""
)


def test_every_reason_the_server_gives_is_in_the_error_table() -> None:
    raised = set()
    for path in (ROOT / "server").rglob("*.py"):
        raised |= set(_RAISED.findall(path.read_text(encoding="utf-8")))
    assert "USER_NOT_FOUND" in raised and "ROUTE_NOT_FOUND" in raised, raised  # the scan works
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    table = text.split("## Errors", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([A-Z][A-Z_]+)`", table))
    assert not raised - _CLI_REASONS - listed, "docs/design.md#errors lacks these reasons"
