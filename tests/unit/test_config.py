"""Configuration validation: every problem is reported whole, with the TOML path of its key.

Each test starts from ``config.example.toml`` (the documented reference) and changes one thing,
so a test fails both when validation stops catching a problem and when the example drifts.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from rotatord.config import Settings, check_references, load_settings
from rotatord.config.load import cross_check
from rotatord.config.model import FileBackendSettings, SecretSettings
from rotatord.errors import ConfigError
from rotatord.schedule import next_cron_time

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"
DB = "secrets[0]"  # demo-bot-db, the fernet secret
API = "secrets[1]"  # demo-bot-api, the api_token secret
# The first ``every`` in the example belongs to demo-bot-db; the comment after it makes it unique.
DB_EVERY = 'every = "1m"\n# How long the old key'


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No override from the developer's shell or CI may change what a test loads."""
    for name in list(os.environ):
        if name.upper().startswith("ROTATORD_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


def example(**replacements: str) -> str:
    """The example text with each ``old -> new`` replacement applied (each must match once)."""
    text = EXAMPLE.read_text()
    for old, new in replacements.items():
        assert text.count(old) == 1, f"config.example.toml no longer contains {old!r} exactly once"
        text = text.replace(old, new)
    return text


def edited(old: str, new: str) -> str:
    return example(**{old: new})


def write(directory: Path, text: str, name: str = "config.toml", mode: int = 0o600) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    os.chmod(path, mode)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.exit_code == 78
    return info.value.problems


def only_problem(tmp_path: Path, text: str) -> str:
    found = problems(write(tmp_path, text))
    assert len(found) == 1, found
    return found[0]


# -- the example ------------------------------------------------------------------------------


def test_example_loads_and_relative_paths_resolve_against_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc" / "rotatord"
    path = write(conf_dir, EXAMPLE.read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter

    settings = load_settings(path)

    daemon = settings.daemon
    assert daemon.state_dir == conf_dir / "var"
    assert daemon.database_url == f"sqlite:///{conf_dir / 'var' / 'state.db'}"
    assert daemon.socket_path == conf_dir / "var" / "control.sock"
    assert daemon.audit_path == conf_dir / "var" / "audit.log"
    assert daemon.log_level == "info"
    assert daemon.startup_jitter == timedelta(seconds=2)
    assert daemon.step_retry_max == timedelta(minutes=10)
    assert daemon.socket_mode_int == 0o660
    backend = settings.backends["local"]
    assert isinstance(backend, FileBackendSettings)
    assert backend.directory == conf_dir / "var" / "secrets"
    assert backend.master_key_file == conf_dir / "var" / "master.key"
    assert backend.master_key_credential is None
    assert backend.max_versions == 20
    assert [(s.name, s.kind) for s in settings.secrets] == [("demo-bot-db", "fernet"), ("demo-bot-api", "api_token")]
    db = settings.secret("demo-bot-db")
    api = settings.secret("demo-bot-api")
    assert db is not None and api is not None
    assert (db.every, db.cron, db.grace, db.propagation, db.keep) == (
        timedelta(minutes=1),
        None,
        timedelta(seconds=30),
        timedelta(seconds=10),
        0,
    )
    assert (api.token_prefix, api.token_ttl, api.grace) == ("demo", timedelta(days=7), timedelta(seconds=20))
    assert settings.secret("nope") is None
    assert cross_check(settings) == []


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    path = write(tmp_path / "conf", edited('state_dir = "var"', f'state_dir = "{tmp_path / "state"}"'))
    assert load_settings(path).daemon.state_dir == tmp_path / "state"


# -- syntax and unknown keys ------------------------------------------------------------------


def test_malformed_toml_names_line_and_column(tmp_path: Path) -> None:
    text = edited("keep = 0\n", "keep = \n")
    line = text.splitlines().index("keep = ") + 1
    message = only_problem(tmp_path, text)
    assert "invalid TOML" in message
    assert f"line {line}, column" in message
    assert str(tmp_path / "config.toml") in message


def test_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'[daemon]\nlog_level = "\xff"\n')
    assert problems(path) == [f"{path}: not UTF-8 text"]


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    assert problems(tmp_path / "absent.toml") == [f"{tmp_path / 'absent.toml'}: configuration file not found"]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("[daemon]\n", "colour = 1\n[daemon]\n", "colour: unknown key"),
        ('log_level = "info"\n', 'log_level = "info"\nlog_levle = "debug"\n', "daemon.log_levle: unknown key"),
        ("max_versions = 20\n", 'max_versions = 20\nregion = "eu"\n', "backends.local.region: unknown key"),
        ("keep = 0\n", "keep = 0\nrotate_on = 1\n", f"{DB}.rotate_on (secret 'demo-bot-db'): unknown key"),
    ],
    ids=["top-level", "daemon", "backend", "secret"],
)
def test_unknown_keys_are_errors(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert only_problem(tmp_path, edited(old, new)) == expected


# -- types and values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("keep = 0\n", 'keep = "two"\n', f"{DB}.keep (secret 'demo-bot-db'): "),
        (DB_EVERY, DB_EVERY.replace('"1m"', "60"), f"{DB}.every (secret 'demo-bot-db'): a duration is a string"),
        ("max_versions = 20", "max_versions = 1", "backends.local.max_versions: "),
        ('log_level = "info"', 'log_level = "loud"', "daemon.log_level: "),
        ('socket_mode = "0660"', 'socket_mode = "0999"', "daemon.socket_mode: must be an octal file mode"),
        ("consumers = []", 'consumers = "support-bot"', f"{DB}.consumers (secret 'demo-bot-db'): "),
    ],
    ids=["string-for-keep", "number-for-every", "max-versions-range", "log-level", "socket-mode", "consumers-type"],
)
def test_wrong_types_and_values_name_the_field(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert only_problem(tmp_path, edited(old, new)).startswith(expected)


@pytest.mark.parametrize("bad", ["5x", "", "-1d", "1m30", "1.5h", "d"])
@pytest.mark.parametrize("field", ["every", "grace"])
def test_bad_durations_are_rejected(tmp_path: Path, field: str, bad: str) -> None:
    old = DB_EVERY if field == "every" else 'grace = "30s"'
    new = DB_EVERY.replace('"1m"', f'"{bad}"') if field == "every" else f'grace = "{bad}"'
    message = only_problem(tmp_path, edited(old, new))
    assert message.startswith(f"{DB}.{field} (secret 'demo-bot-db'): ")
    assert ("empty duration" if bad == "" else f"invalid duration {bad!r}") in message


@pytest.mark.parametrize(("text", "seconds"), [("1h30m", 5400), ("2w", 1209600), ("45s", 45), (" 1D ", 86400)])
def test_good_durations_parse(tmp_path: Path, text: str, seconds: int) -> None:
    settings = load_settings(write(tmp_path, edited('grace = "30s"', f'grace = "{text}"')))
    assert settings.secrets[0].grace == timedelta(seconds=seconds)


def test_every_below_ten_seconds_is_rejected(tmp_path: Path) -> None:
    message = only_problem(tmp_path, edited(DB_EVERY, DB_EVERY.replace('"1m"', '"9s"')))
    assert message == f"{DB}.every (secret 'demo-bot-db'): must be at least 10s"
    ok = load_settings(write(tmp_path, edited(DB_EVERY, DB_EVERY.replace('"1m"', '"10s"'))))
    assert ok.secrets[0].every == timedelta(seconds=10)


@pytest.mark.parametrize(
    ("cron", "reason"),
    [("61 * * * *", "61"), ("0 3 * *", "expected 5 fields"), ("0 3 * * 8", "out of range"), ("0 3 * * 1 x", "5")],
)
def test_bad_cron_is_rejected(tmp_path: Path, cron: str, reason: str) -> None:
    message = only_problem(tmp_path, edited(DB_EVERY, DB_EVERY.replace('every = "1m"', f'cron = "{cron}"')))
    assert message.startswith(f"{DB}.cron (secret 'demo-bot-db'): invalid cron expression {cron!r}")
    assert reason in message


def test_good_cron_is_accepted(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, edited(DB_EVERY, DB_EVERY.replace('every = "1m"', 'cron = "0 3 * * 1"'))))
    assert (settings.secrets[0].cron, settings.secrets[0].every) == ("0 3 * * 1", None)


def test_both_every_and_cron_is_rejected(tmp_path: Path) -> None:
    message = only_problem(tmp_path, edited(DB_EVERY, 'cron = "0 3 * * 1"\n' + DB_EVERY))
    assert message.startswith(f"{DB}.cron (secret 'demo-bot-db'): ")
    assert "'every'" in message and "only one" in message


def test_neither_every_nor_cron_is_rejected(tmp_path: Path) -> None:
    message = only_problem(tmp_path, edited(DB_EVERY, DB_EVERY.replace('every = "1m"\n', "")))
    assert message.startswith(f"{DB}.every (secret 'demo-bot-db'): missing")
    assert "'cron'" in message


# -- names, references between sections, kind rules ----------------------------------------


def test_duplicate_secret_names(tmp_path: Path) -> None:
    message = only_problem(tmp_path, edited('name = "demo-bot-api"', 'name = "demo-bot-db"'))
    assert message == f"{API}.name (secret 'demo-bot-db'): duplicate secret name (also secrets[0])"


def test_two_secrets_on_one_backend_path(tmp_path: Path) -> None:
    message = only_problem(tmp_path, edited('path = "bots/demo-bot/api-token"', 'path = "bots/demo-bot/db-key"'))
    assert message.startswith(f"{API}.path (secret 'demo-bot-api'): ")
    assert "'bots/demo-bot/db-key'" in message and "'demo-bot-db'" in message


def test_same_path_on_different_backends_is_fine(tmp_path: Path) -> None:
    text = edited('path = "bots/demo-bot/api-token"', 'path = "bots/demo-bot/db-key"')
    text = text.replace(
        'backend = "local"\npath = "bots/demo-bot/db-key"\nevery',
        'backend = "other"\npath = "bots/demo-bot/db-key"\nevery',
    )
    text += '\n[backends.other]\nkind = "file"\ndirectory = "var/other"\nmaster_key_file = "var/other.key"\n'
    settings = load_settings(write(tmp_path, text))
    assert sorted(s.backend for s in settings.secrets) == ["local", "other"]


def test_unknown_backend(tmp_path: Path) -> None:
    old = 'backend = "local"\npath = "bots/demo-bot/api-token"'
    message = only_problem(tmp_path, edited(old, old.replace('"local"', '"vault"')))
    assert message == f"{API}.backend (secret 'demo-bot-api'): unknown backend 'vault' (defined: local)"


def test_unknown_backend_kind(tmp_path: Path) -> None:
    message = only_problem(tmp_path, edited('kind = "file"', 'kind = "s3"'))
    assert message == "backends.local.kind: unknown kind 's3' (expected one of: file, vault, aws)"


def test_missing_backend_kind(tmp_path: Path) -> None:
    message = only_problem(tmp_path, edited('kind = "file"\n', ""))
    assert message == "backends.local.kind: missing required key (expected one of: file, vault, aws)"


def test_consumer_not_defined(tmp_path: Path) -> None:
    message = only_problem(tmp_path, edited("consumers = []", 'consumers = ["support-bot"]'))
    assert message == f"{DB}.consumers (secret 'demo-bot-db'): consumer 'support-bot' is not defined under [consumers]"


CONSUMER = """
[consumers.support-bot]
url = "https://support-bot.internal/hooks/rotatord"
signing_secret = "{secret}"
required = true
"""
WEBHOOK_SECRET = """
[[secrets]]
name = "support-bot-webhook"
kind = "webhook_secret"
backend = "local"
path = "bots/support-bot/webhook"
every = "30d"
"""


def allowed(text: str) -> str:
    return text.replace("allow = []", 'allow = ["support-bot.internal"]')


def test_signing_secret_must_be_a_webhook_secret(tmp_path: Path) -> None:
    message = only_problem(tmp_path, allowed(example()) + CONSUMER.format(secret="demo-bot-api"))
    assert message.startswith("consumers.support-bot.signing_secret: 'demo-bot-api' is of kind 'api_token'")
    message = only_problem(tmp_path, allowed(example()) + CONSUMER.format(secret="missing-secret"))
    assert message.startswith("consumers.support-bot.signing_secret: 'missing-secret' is not a managed secret")


def test_signing_secret_naming_a_webhook_secret_is_accepted(tmp_path: Path) -> None:
    text = allowed(edited("consumers = []", 'consumers = ["support-bot"]')) + CONSUMER.format(
        secret="support-bot-webhook"
    )
    settings = load_settings(write(tmp_path, text + WEBHOOK_SECRET))
    consumer = settings.consumers["support-bot"]
    assert (consumer.signing_secret, consumer.required, consumer.timeout) == (
        "support-bot-webhook",
        True,
        timedelta(seconds=15),
    )
    assert settings.secrets[0].consumers == ("support-bot",)


def test_consumer_outside_the_allowlist_is_refused(tmp_path: Path) -> None:
    text = edited("consumers = []", 'consumers = ["support-bot"]') + CONSUMER.format(secret="support-bot-webhook")
    message = only_problem(tmp_path, text + WEBHOOK_SECRET)
    assert message.startswith("consumers.support-bot.url: host 'support-bot.internal' is not in notify.allow")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://support-bot.internal/hooks", "consumers.support-bot.url: "),
        ("https://user:pw@support-bot.internal/hooks", "consumers.support-bot.url: "),
        ("http://169.254.169.254/latest", "consumers.support-bot.url: "),
    ],
)
def test_bad_consumer_urls_are_refused(tmp_path: Path, url: str, expected: str) -> None:
    text = allowed(edited("consumers = []", 'consumers = ["support-bot"]'))
    text += CONSUMER.format(secret="support-bot-webhook").replace("https://support-bot.internal/hooks/rotatord", url)
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text + WEBHOOK_SECRET))
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


def test_token_prefix_on_a_fernet_secret(tmp_path: Path) -> None:
    message = only_problem(tmp_path, edited("keep = 0\n", 'keep = 0\ntoken_prefix = "demo"\n'))
    assert message == f"{DB}.token_prefix (secret 'demo-bot-db'): only applies to kind 'api_token', not 'fernet'"


def test_keep_on_an_api_token(tmp_path: Path) -> None:
    message = only_problem(tmp_path, edited('token_ttl = "7d"', 'token_ttl = "7d"\nkeep = 2'))
    assert message == f"{API}.keep (secret 'demo-bot-api'): only applies to kind 'fernet', not 'api_token'"


@pytest.mark.parametrize("path", ["bots/../db-key", "../db-key", "bots/./db-key", "bots/demo-bot/.."])
def test_path_with_dot_segments(tmp_path: Path, path: str) -> None:
    message = only_problem(tmp_path, edited('path = "bots/demo-bot/db-key"', f'path = "{path}"'))
    assert message == f"{DB}.path (secret 'demo-bot-db'): must not contain '.' or '..' segments"


@pytest.mark.parametrize("path", ["/bots/db-key", "bots//db-key", "bots/db key"])
def test_malformed_paths(tmp_path: Path, path: str) -> None:
    message = only_problem(tmp_path, edited('path = "bots/demo-bot/db-key"', f'path = "{path}"'))
    assert message.startswith(f"{DB}.path (secret 'demo-bot-db'): must be segments of letters")


def test_secret_name_with_uppercase(tmp_path: Path) -> None:
    message = only_problem(tmp_path, edited('name = "demo-bot-db"', 'name = "Demo-Bot-DB"'))
    assert message.startswith(f"{DB}.name (secret 'Demo-Bot-DB'): must be 1 to 63 lowercase letters")
    assert message.endswith("not 'Demo-Bot-DB'")


def test_backend_with_both_master_key_sources(tmp_path: Path) -> None:
    text = edited('# master_key_credential = "rotatord-master-key"', 'master_key_credential = "rotatord-master-key"')
    message = only_problem(tmp_path, text)
    assert message.startswith("backends.local.master_key_credential: set only one of")
    assert "master_key_file" in message


def test_backend_with_no_master_key_source(tmp_path: Path) -> None:
    message = only_problem(tmp_path, edited('master_key_file = "var/master.key"\n', ""))
    assert message.startswith("backends.local.master_key_file: missing")
    assert "master_key_credential" in message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = example(
        **{"keep = 0\n": 'keep = "x"\n', 'grace = "20s"': 'grace = "soon"', "[daemon]\n": "[daemon]\nnope = 1\n"}
    )
    found = problems(write(tmp_path, text))
    assert [p.split(":")[0] for p in found] == [
        "daemon.nope",
        f"{DB}.keep (secret 'demo-bot-db')",
        f"{API}.grace (secret 'demo-bot-api')",
    ]
    text = example(
        **{
            'name = "demo-bot-api"': 'name = "demo-bot-db"',
            "consumers = []": 'consumers = ["ghost"]',
            'token_ttl = "7d"': 'token_ttl = "7d"\nkeep = 1',
        }
    )
    found = problems(write(tmp_path, text))
    assert sorted(p.split(" ")[0] for p in found) == [f"{DB}.consumers", f"{API}.keep", f"{API}.name"]


def test_cross_check_on_settings_built_in_python() -> None:
    backend = FileBackendSettings(kind="file", directory=Path("/srv/s"), master_key_file=Path("/srv/k"))

    def secret(name: str, **extra: object) -> SecretSettings:
        values: dict[str, object] = {"name": name, "kind": "fernet", "backend": "main", "path": name, "every": "30d"}
        values.update(extra)
        return SecretSettings.model_validate(values)

    good = Settings(backends={"main": backend}, secrets=(secret("a"), secret("b", cron="0 3 * * 1", every=None)))
    assert cross_check(good) == []
    bad = Settings(
        backends={"main": backend},
        secrets=(secret("a"), secret("a", path="other", backend="nowhere"), secret("c", cron="0 3 * * 1")),
    )
    assert cross_check(bad) == [
        "secrets[1].name (secret 'a'): duplicate secret name (also secrets[0])",
        "secrets[1].backend (secret 'a'): unknown backend 'nowhere' (defined: main)",
        "secrets[2].cron (secret 'c'): 'every' is set too; set only one of 'every' and 'cron'",
    ]


# -- environment overrides and immutability ------------------------------------------------


def test_environment_override_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, example())
    monkeypatch.setenv("ROTATORD_DAEMON__LOG_LEVEL", "debug")
    monkeypatch.setenv("ROTATORD_BACKENDS__LOCAL__MAX_VERSIONS", "5")
    settings = load_settings(path)
    assert settings.daemon.log_level == "debug"
    assert settings.backends["local"].max_versions == 5
    # An override replaces one key, not its whole section.
    assert settings.daemon.startup_jitter == timedelta(seconds=2)
    assert settings.backends["local"].master_key_file == tmp_path / "var" / "master.key"


def test_invalid_environment_value_names_the_field_and_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, example())
    monkeypatch.setenv("ROTATORD_DAEMON__STARTUP_JITTER", "oops")
    assert problems(path) == [
        "daemon.startup_jitter (from $ROTATORD_DAEMON__STARTUP_JITTER): "
        "invalid duration 'oops': use a number and a unit (s, m, h, d, w), e.g. '30d' or '1h30m'"
    ]


def test_unknown_environment_key_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, example())
    monkeypatch.setenv("ROTATORD_DAEMON__LOG_LEVLE", "debug")  # a typo must not be ignored silently
    assert problems(path) == ["daemon.log_levle (from $ROTATORD_DAEMON__LOG_LEVLE): unknown key"]


def test_environment_section_that_is_not_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, example())
    monkeypatch.setenv("ROTATORD_BACKENDS", "local")
    [message] = problems(path)
    assert message.startswith("backends (from $ROTATORD_BACKENDS): not valid JSON")


def test_rotatord_config_variable_is_not_a_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, example())
    monkeypatch.setenv("ROTATORD_CONFIG", str(path))
    assert len(load_settings(path).secrets) == 2


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, example()))
    with pytest.raises(ValidationError, match="frozen"):
        settings.daemon = settings.daemon  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        settings.daemon.log_level = "debug"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        settings.secrets[0].every = None  # type: ignore[misc]
    with pytest.raises(TypeError):
        settings.backends["other"] = settings.backends["local"]  # type: ignore[index]
    with pytest.raises(TypeError):
        settings.consumers["x"] = None  # type: ignore[index]
    with pytest.raises(TypeError):
        settings.secrets[0] = settings.secrets[1]  # type: ignore[index]
    assert settings.daemon.log_level == "info" and list(settings.backends) == ["local"]
    assert settings.model_dump()["backends"]["local"]["max_versions"] == 20


# -- referenced files ------------------------------------------------------------------------


@pytest.fixture
def initialised(tmp_path: Path) -> tuple[Path, Settings]:
    """The example in tmp_path at 0600, with a placeholder master key file at 0600."""
    path = write(tmp_path, example())
    key = tmp_path / "var" / "master.key"
    key.parent.mkdir(mode=0o700)
    key.write_text("placeholder, not a key\n")
    os.chmod(key, 0o600)
    return path, load_settings(path)


def test_references_clean(initialised: tuple[Path, Settings]) -> None:
    path, settings = initialised
    assert check_references(settings, path) == []


def test_missing_master_key_suggests_init(tmp_path: Path) -> None:
    path = write(tmp_path, example())
    settings = load_settings(path)
    [problem] = check_references(settings, path)
    assert problem.startswith("backends.local.master_key_file: ")
    assert str(tmp_path / "var" / "master.key") in problem and "does not exist" in problem
    assert "rotatord init" in problem
    # ``init`` checks with require_existing=False: it is about to create the key.
    assert check_references(settings, path, require_existing=False) == []


def test_master_key_readable_by_others(initialised: tuple[Path, Settings]) -> None:
    path, settings = initialised
    os.chmod(path.parent / "var" / "master.key", 0o644)
    for require_existing in (True, False):
        [problem] = check_references(settings, path, require_existing=require_existing)
        assert problem.startswith("backends.local.master_key_file: ")
        assert "mode 0644" in problem and "chmod 600" in problem


def test_config_readable_by_others_while_referencing_credentials(initialised: tuple[Path, Settings]) -> None:
    path, settings = initialised
    os.chmod(path, 0o644)
    [problem] = check_references(settings, path)
    assert problem.startswith(f"{path}: readable by group or others (mode 0644)")
    assert "chmod 600" in problem


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o660])
def test_config_writable_by_others(initialised: tuple[Path, Settings], mode: int) -> None:
    path, settings = initialised
    os.chmod(path, mode)
    [problem] = check_references(settings, path)
    assert problem.startswith(f"{path}: writable by group or others (mode {mode:04o})")


CREDENTIAL_TEXT = {
    'master_key_file = "var/master.key"\n': "",
    '# master_key_credential = "rotatord-master-key"': 'master_key_credential = "rotatord-master-key"',
}


def test_master_key_credential_without_credentials_directory(tmp_path: Path) -> None:
    path = write(tmp_path, example(**CREDENTIAL_TEXT))
    settings = load_settings(path)
    assert settings.backends["local"].master_key_credential == "rotatord-master-key"
    [problem] = check_references(settings, path)
    assert problem.startswith("backends.local.master_key_credential: ")
    assert "$CREDENTIALS_DIRECTORY is not set" in problem and "LoadCredential=" in problem


def test_master_key_credential_with_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "conf", example(**CREDENTIAL_TEXT))
    settings = load_settings(path)
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    [problem] = check_references(settings, path)
    assert problem.startswith("backends.local.master_key_credential: ")
    assert str(creds / "rotatord-master-key") in problem and "does not exist" in problem
    (creds / "rotatord-master-key").write_text("placeholder, not a key\n")
    os.chmod(creds / "rotatord-master-key", 0o400)  # what systemd's LoadCredential= provides
    assert check_references(settings, path) == []


# -- crontab weekdays ------------------------------------------------------------------------

SUNDAY = datetime(2025, 1, 5, 12, 0, tzinfo=UTC)  # Sunday noon


def test_cron_weekday_one_is_monday() -> None:
    assert SUNDAY.strftime("%A") == "Sunday"
    assert next_cron_time("0 3 * * 1", SUNDAY) == datetime(2025, 1, 6, 3, 0, tzinfo=UTC)
    assert next_cron_time("0 3 * * mon", SUNDAY) == datetime(2025, 1, 6, 3, 0, tzinfo=UTC)


@pytest.mark.parametrize("dow", ["0", "7", "sun"])
def test_cron_weekday_zero_and_seven_are_sunday(dow: str) -> None:
    saturday = SUNDAY - timedelta(days=1)
    assert next_cron_time(f"0 3 * * {dow}", saturday) == datetime(2025, 1, 5, 3, 0, tzinfo=UTC)
    # Strictly after: from Sunday noon, the next Sunday 03:00 is a week later.
    assert next_cron_time(f"0 3 * * {dow}", SUNDAY) == datetime(2025, 1, 12, 3, 0, tzinfo=UTC)


def test_cron_weekday_range_skips_the_weekend() -> None:
    friday_late = datetime(2025, 1, 10, 4, 0, tzinfo=UTC)
    assert next_cron_time("0 3 * * 1-5", friday_late) == datetime(2025, 1, 13, 3, 0, tzinfo=UTC)
    assert next_cron_time("0 3 * * 5-7", datetime(2025, 1, 6, 4, 0, tzinfo=UTC)) == datetime(
        2025, 1, 10, 3, 0, tzinfo=UTC
    )


def test_cron_weekday_step_over_star_counts_from_sunday() -> None:
    # crontab: */2 = 0,2,4,6 = Sunday, Tuesday, Thursday, Saturday; from Sunday noon -> Tuesday.
    assert next_cron_time("0 3 * * */2", SUNDAY) == datetime(2025, 1, 7, 3, 0, tzinfo=UTC)


def test_cron_day_of_month_or_weekday() -> None:
    # crontab: '0 3 1 * 1' fires on the 1st of each month AND on every Monday.
    assert next_cron_time("0 3 1 * 1", SUNDAY) == datetime(2025, 1, 6, 3, 0, tzinfo=UTC)
