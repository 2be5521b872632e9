"""The settings declaration: each field declared, shown in --help and the README, parsed once."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from server import config, settings
from server.__main__ import _parser, main

ROOT = Path(__file__).resolve().parents[2]


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        _parser().parse_args([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.fixture(autouse=True)
def _wide_help(monkeypatch: pytest.MonkeyPatch) -> None:
    # One line per option in --help, whatever the terminal: argparse reads COLUMNS.
    monkeypatch.setenv("COLUMNS", "1000")
    for declared in config.SETTINGS:
        monkeypatch.delenv(declared.setting.env, raising=False)


def test_every_config_field_is_declared_with_env_and_help() -> None:
    declared = {d.name: d.setting for d in config.SETTINGS}
    assert len(declared) == len(config.SETTINGS)  # a flag's dest is the field name
    for cls in (config.Config, config.SecurityConfig):
        for f in dataclasses.fields(cls):
            if f.default_factory is config.SecurityConfig or f.name == "set_by_env":
                continue  # the nested group (checked as SecurityConfig) and where values came from
            setting = declared[f.name]
            assert setting.env.isupper() and setting.env.replace("_", "").isalnum(), f.name
            assert setting.help and setting.shown, f.name
    envs = [d.setting.env for d in config.SETTINGS]
    assert len(envs) == len(set(envs))


def test_serve_help_lists_every_flag_default_and_env(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, "serve")
    # One entry per option: its line, and the next when a long flag pushes the help there.
    entries = re.split(r"\n(?=  \S)", text)
    for declared in config.SETTINGS:
        env, shown = declared.setting.env, declared.setting.shown
        if declared.flag is None:  # environment only: listed after the options
            assert any(env in e and f"default {shown}" in e for e in entries), env
            continue
        entry = next(e for e in entries if e.strip().startswith(declared.flag))
        assert f"(default {shown}; env {env})" in " ".join(entry.split()), entry


def test_flags_win_over_env_and_env_over_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    def parse(*argv: str) -> config.Config:
        return config.from_arguments(_parser().parse_args(["serve", *argv]))

    assert parse() == config.Config()
    monkeypatch.setenv("MEMSTORE_PORT", "6000")
    monkeypatch.setenv("MEMSTORE_PURGE_RETENTION_DAYS", "0.5")
    monkeypatch.setenv("MEMSTORE_TOKEN_KEY", "k" * 32)
    monkeypatch.setenv("MEMSTORE_METRICS_PORT", "")  # empty: as if unset
    got = parse()
    assert (got.port, got.purge_retention.total_seconds(), got.token_key) == (
        6000,
        43200.0,
        b"k" * 32,
    )
    assert got.metrics_port is None
    assert parse("--port", "7000").port == 7000


@pytest.mark.parametrize(
    ("text", "value"), [("1", True), ("true", True), ("ON", True), ("yes", True), ("0", False)]
)
def test_one_boolean_parser_for_every_switch(
    monkeypatch: pytest.MonkeyPatch, text: str, value: bool
) -> None:
    # MEMSTORE_INSECURE and MEMSTORE_REFLECTION once read booleans each their own way.
    monkeypatch.setenv("MEMSTORE_INSECURE", text)
    monkeypatch.setenv("MEMSTORE_REFLECTION", text)
    got = config.from_arguments(_parser().parse_args(["serve"]))
    assert (got.security.insecure, got.reflection) == (value, value)
    flagged = config.from_arguments(_parser().parse_args(["serve", "--no-insecure"]))
    assert flagged.security.insecure is False


@pytest.mark.parametrize(
    ("env", "text"),
    [
        ("MEMSTORE_PORT", "fifty"),
        ("MEMSTORE_INSECURE", "maybe"),
        ("MEMSTORE_WORKERS", "0"),
        ("MEMSTORE_LOG_FORMAT", "xml"),
        ("MEMSTORE_GRACE_PERIOD", "nan"),
    ],
)
def test_a_bad_variable_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: str, text: str
) -> None:
    monkeypatch.setenv(env, text)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"memstore serve: {env}: "), err


def test_a_bad_flag_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        _parser().parse_args(["serve", "--pool-timeout", "soon"])
    assert done.value.code == 2
    assert "argument --pool-timeout: 'soon' is not a number" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        # Each stopped the command with a traceback (OverflowError, psycopg's ValueError)...
        (["serve", "--port", "70000"], "argument --port: must be 0 to 65535, not 70000"),
        (["serve", "--metrics-port", "-1"], "argument --metrics-port: must be 0 to 65535"),
        (["purge", "--purge-retention-days", "99999999999"], "at most 36500"),
        (["serve", "--pool-max-size", "0"], "argument --pool-max-size: must be at least 1"),
        # ... or was taken: a retention of -1 day purged every soft-deleted row at once, a
        # statement timeout past PostgreSQL's 2^31 - 1 ms failed every connection, said
        # as "database unavailable".
        (["purge", "--purge-retention-days", "-1"], "must not be negative, not -1"),
        (["serve", "--statement-timeout", "1e300"], "at most 2147483 seconds"),
        (["serve", "--pool-timeout", "-1"], "argument --pool-timeout: must be more than 0, not -1"),
        # A wait of none failed every call; an empty URL is libpq's "every default", which
        # migrated the OS user's database, one nobody named.
        (["serve", "--pool-timeout", "0"], "argument --pool-timeout: must be more than 0"),
        (["migrate", "--database-url", ""], "argument --database-url: is empty"),
        (["serve", "--database-url", "  "], "argument --database-url: is empty"),
        (["serve", "--grace-period", "-5"], "argument --grace-period: must not be negative"),
        (["serve", "--drain-delay", "1e300"], "--drain-delay: must be at most 86400 seconds"),
        (["serve", "--grace-period", "86401"], "--grace-period: must be at most 86400 seconds"),
        (["serve", "--pool-max-waiting", "-1"], "argument --pool-max-waiting: must not be"),
        (["serve", "--pool-min-size", "-2"], "argument --pool-min-size: must not be negative"),
        # A cap of 0 would refuse every call; past gRPC's backlog it could never be reached.
        (["serve", "--max-calls-in-flight", "0"], "--max-calls-in-flight: must be at least 1"),
        (["serve", "--max-calls-in-flight", "2000000"], "must be at most 1000000, not 2000000"),
        # A period of 1e-9 purged 6,440 times in 6 s; one of 1e300 meant "never" (an audit).
        (["serve", "--purge-interval", "1e-9"], "--purge-interval: must be 0 (off) or at least 1"),
        (["serve", "--purge-interval", "1e300"], "--purge-interval: must be at most 86400"),
    ],
)
def test_a_flag_out_of_its_range_names_the_flag(
    capsys: pytest.CaptureFixture[str], argv: list[str], said: str
) -> None:
    with pytest.raises(SystemExit) as done:
        _parser().parse_args(argv)
    assert done.value.code == 2
    assert said in capsys.readouterr().err


def test_a_pool_smaller_than_its_minimum_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # psycopg's ValueError("max_size must be greater or equal than min_size") was a traceback.
    assert main(["serve", "--pool-min-size", "20", "--pool-max-size", "2"]) == 2
    err = capsys.readouterr().err
    assert err == "memstore serve: --pool-min-size (20) is more than --pool-max-size (2)\n"
    # Set by its variable, the error names the variable (it named --pool-min-size).
    monkeypatch.setenv("MEMSTORE_POOL_MIN_SIZE", "11")
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "memstore migrate: MEMSTORE_POOL_MIN_SIZE (11) is more than --pool-max-size (10)\n"
    )


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--port", "9000", "--metrics-port", "9000"], "--metrics-port (9000) is --port's"),
        (
            ["--http-port", "9000", "--metrics-port", "9000"],
            "--metrics-port (9000) is --http-port's",
        ),
        # With --workers 3 the metrics take 9000..9002.
        (["--workers", "3", "--port", "9002", "--metrics-port", "9000"], "is --port's"),
        (["--port", "9000", "--http-port", "9000"], "--http-port (9000) is --port's"),
    ],
)
def test_two_servers_on_one_port_are_refused_naming_the_flags(argv: list[str], said: str) -> None:
    # The metrics server took 127.0.0.1:PORT and gRPC only [::1]:PORT, with a warning in
    # gRPC's own log: a client of 127.0.0.1 reached /metrics. The same --http-port as --port
    # said "port 9000 is in use", by memstore itself. (main prints a ConfigError as one line.)
    with pytest.raises(settings.ConfigError, match=re.escape(said)):
        config.from_arguments(_parser().parse_args(["serve", *argv]))


@pytest.mark.parametrize(
    ("env", "argv", "said"),
    [
        ({"MEMSTORE_HTTP_PORT": "50051"}, [], "MEMSTORE_HTTP_PORT (50051) is --port's too"),
        ({"MEMSTORE_PORT": "8000"}, [], "--http-port (8000) is MEMSTORE_PORT's too"),
        (
            {"MEMSTORE_METRICS_PORT": "9000"},
            ["--port", "9000"],
            "MEMSTORE_METRICS_PORT (9000) is --port's too",
        ),
    ],
)
def test_two_servers_on_one_port_name_the_variables_that_set_them(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], argv: list[str], said: str
) -> None:
    # Set by its environment variable, a port was still named by its flag, which the user
    # never typed ("--http-port (50051) is --port's too" for MEMSTORE_HTTP_PORT=50051).
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(settings.ConfigError, match=re.escape(said)):
        config.from_arguments(_parser().parse_args(["serve", *argv]))


def _valid_text(declared: settings.Declared) -> str:
    # A value each setting's parser takes.
    for text in ("10", "1", "text", "none", "INFO", "*"):
        try:
            declared.setting.parse(text)
        except ValueError:
            continue
        return text
    raise AssertionError(declared.name)


@pytest.mark.parametrize("declared", config.SETTINGS, ids=lambda d: d.name)
def test_every_setting_is_named_by_what_set_it(
    monkeypatch: pytest.MonkeyPatch, declared: settings.Declared
) -> None:
    # settings.source, which errors about a value name it by: the variable when the
    # environment set it, else the flag; a setting without a flag, always its variable.
    command, text = declared.setting.commands[0], _valid_text(declared)
    security = declared.name in {f.name for f in dataclasses.fields(config.SecurityConfig)}

    def named(*argv: str) -> str:
        got = config.from_arguments(_parser().parse_args([command, *argv]))
        return settings.source(got.security if security else got, declared.name)

    assert named() == (declared.flag or declared.setting.env)
    if declared.flag is not None:
        flag = [declared.flag] if declared.setting.parse is settings.parse_bool else []
        assert named(*(flag or [declared.flag, text])) == declared.flag
    monkeypatch.setenv(declared.setting.env, text)
    assert named() == declared.setting.env
    if declared.flag is not None:
        assert named(*(flag or [declared.flag, text])) == declared.flag


def test_key_commands_offer_and_read_only_the_database(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (("keys", "create"), ("keys", "list"), ("projects", "create")):
        text = _help(capsys, *argv)
        assert "--database-url" in text and "--data-dir" in text, argv
        # They open the store, so an unreachable database stops them after --pool-timeout
        # (README); they took no such flag and ignored the variable (always 5 s).
        assert "--pool-timeout" in text, argv
        for other in ("--port", "--host", "--tls-cert", "--workers", "--pool-max-size"):
            assert other not in text, (argv, other)
    # Nor do they read a serving variable: a bad one cannot break them.
    monkeypatch.setenv("MEMSTORE_PORT", "fifty")
    monkeypatch.setenv("MEMSTORE_DATA_DIR", "/srv/memstore")
    monkeypatch.setenv("MEMSTORE_POOL_TIMEOUT", "1.5")
    got = config.from_arguments(_parser().parse_args(["keys", "list"]))
    assert (got.port, got.data_dir, got.pool_timeout) == (50051, Path("/srv/memstore"), 1.5)
    got = config.from_arguments(_parser().parse_args(["projects", "list", "--pool-timeout", "2"]))
    assert got.pool_timeout == 2


def test_migrate_and_purge_offer_what_they_use(capsys: pytest.CaptureFixture[str]) -> None:
    migrate = _help(capsys, "migrate")
    purge = _help(capsys, "purge")
    for text in (migrate, purge):
        assert "--database-url" in text and "--pool-timeout" in text
        assert "--port" not in text and "--tls-cert" not in text
    assert "--purge-retention-days" in purge and "--purge-retention-days" not in migrate


def test_readme_configuration_table_matches_the_declaration() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    for declared in config.SETTINGS:
        env = f"`{declared.setting.env}`"
        row = next((r for r in rows if env in r), None)
        assert row is not None, declared.setting.env
        if declared.flag is not None:
            assert f"`{declared.flag}`" in row, row
            if declared.setting.parse is settings.parse_bool:  # argparse adds the --no- form
                assert f"`--no-{declared.flag.removeprefix('--')}`" in row, row
        assert declared.setting.shown in row.replace("`", ""), row


def test_the_overload_refusal_names_what_set_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.errors import ResourceExhausted
    from server.serving.app import _call_limit

    def refusal(*argv: str) -> str:
        limit = _call_limit(config.from_arguments(_parser().parse_args(["serve", *argv])))
        limit.enter()
        with pytest.raises(ResourceExhausted) as refused:
            limit.enter()
        return str(refused.value)

    assert "1 calls are in flight (--max-calls-in-flight)" in refusal("--max-calls-in-flight", "1")
    monkeypatch.setenv("MEMSTORE_MAX_CALLS_IN_FLIGHT", "1")
    assert "(MEMSTORE_MAX_CALLS_IN_FLIGHT)" in refusal()
