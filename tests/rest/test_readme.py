"""The README's "Coming from Zep" curl lines run, in order, against a live server."""

from __future__ import annotations

import subprocess

from tests.fix_db import ROOT
from tests.fix_rest import ZepServer


def _script(base_url: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Coming from Zep", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    host = base_url.removeprefix("http://")
    # Any answer other than 2xx fails the script, and with it the test.
    return block.replace("localhost:8000", host).replace("curl -sS", "curl -sS --fail-with-body")


def test_readme_curl_examples_run(zep: ZepServer) -> None:
    script = _script(zep.base_url)
    assert script.count("curl ") >= 24, script
    run = subprocess.run(
        ["bash", "-e", "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert out.startswith(".")  # /healthz
    assert '"metadata":{"lang":"en","plan":"pro"}' in out  # merged (jsonb orders keys)
    assert out.count('"content":"Hi, I am vegetarian."') >= 4  # memory, messages, get, search
    assert '"metadata":{"checked":true}' in out
    assert '"total_count":1' in out
    assert out.rstrip().endswith('{"message":"OK"}')
