"""The ``aws`` backend and reader against a real moto server: the staging protocol, crash
recovery, refusals, error mapping, and the IAM policies shipped in ``contrib/aws``.

What moto cannot show: IAM resource ARNs and conditions (moto evaluates Secrets Manager actions
against ``*`` only, so the policy tests check the action lists), KMS (no key is ever used),
eventual consistency, throttling, and AWS deleting deprecated versions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from rotatord.backends.aws import (
    MANAGED_TAG,
    AwsBackend,
    SecretsManagerKV,
    load_shared_credentials,
    request_id_of,
    version_id_for,
)
from rotatord.client.aws import AwsReader
from rotatord.config.model import AwsBackendSettings
from rotatord.document import FernetRing, digest, dump_document, parse_document
from rotatord.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    ConflictError,
    DocumentInvalid,
    NotManaged,
    PermissionDenied,
)
from tests.contract.conftest import api_tokens, fernet_ring, materials
from tests.servers import free_port
from tests.servers.moto import (
    REGION,
    MotoServer,
    assert_sane_labels,
    aws_settings,
    describe_stages,
    start_moto,
    write_credentials,
)

REPO = Path(__file__).resolve().parents[2]
PATH = "bots/bot/db-key"


@pytest.fixture
def settings(moto_server: MotoServer, tmp_path: Path) -> AwsBackendSettings:
    return aws_settings(moto_server, tmp_path)


@pytest.fixture
def backend(settings: AwsBackendSettings) -> Iterator[AwsBackend]:
    b = AwsBackend("aws", settings)
    yield b
    b.close()


@pytest.fixture
def sm(moto_server: MotoServer) -> Any:
    return moto_server.client()


def name_of(settings: AwsBackendSettings, path: str = PATH) -> str:
    return f"{settings.path_prefix}/{path}"


def version_count(sm: Any, name: str) -> int:
    return len(sm.list_secret_version_ids(SecretId=name, IncludeDeprecated=True)["Versions"])


def labels_of(moto: MotoServer, name: str, version: str) -> list[str]:
    return describe_stages(moto, name).get(version, [])


# -- version ids ---------------------------------------------------------------------------------


def test_version_id_carries_the_engines_request_id_and_binds_the_base_version() -> None:
    rid = uuid.uuid4().hex
    first = version_id_for(rid, "base-version")
    assert len(first) == 64 and first.startswith(f"{rid}-")
    assert request_id_of(first) == rid
    assert version_id_for(rid, "base-version") == first  # a retry reaches the same version
    assert version_id_for(rid, "another-base") != first  # a retry on a moved secret does not
    assert version_id_for(rid, None) != first
    hashed = version_id_for("create-1", None)  # not a VersionId-safe request id: hashed, still 64
    assert len(hashed) == 64 and request_id_of(hashed) is None
    assert request_id_of(str(uuid.uuid4())) is None  # someone else's VersionId


# -- the protocol --------------------------------------------------------------------------------


def test_write_publishes_canonical_json_tagged_and_reads_name_the_stage(
    backend: AwsBackend, settings: AwsBackendSettings, sm: Any, moto_server: MotoServer
) -> None:
    name = name_of(settings)
    one, two = fernet_ring(version=1), fernet_ring(version=2, keys=2)
    rid1, rid2 = uuid.uuid4().hex, uuid.uuid4().hex
    v1 = backend.write(PATH, one, expected=None, request_id=rid1)
    v2 = backend.write(PATH, two, expected=v1, request_id=rid2)
    assert (request_id_of(v1), request_id_of(v2)) == (rid1, rid2)
    described = sm.describe_secret(SecretId=name)
    assert {"Key": MANAGED_TAG[0], "Value": MANAGED_TAG[1]} in described["Tags"]
    assert described["VersionIdsToStages"] == {v1: ["AWSPREVIOUS"], v2: ["AWSCURRENT"]}
    raw = sm.get_secret_value(SecretId=name, VersionStage="AWSCURRENT")
    assert (raw["VersionId"], raw["SecretString"]) == (v2, dump_document(two).decode())
    # After the label move the backend returns the new value: it names the stage.  (moto's
    # stage-less read keeps answering with the old one, which is why it must.)
    got = backend.read(PATH)
    assert got is not None
    assert (got.version, got.request_id, digest(got.document)) == (v2, rid2, digest(two))
    assert [(h.version, h.current, h.request_id) for h in backend.history(PATH)] == [
        (v1, False, rid1),
        (v2, True, rid2),
    ]
    assert_sane_labels(moto_server, name)


_RACER = """
import json, sys
from datetime import timedelta
from pathlib import Path
from rotatord.backends.aws import AwsBackend
from rotatord.config.model import AwsBackendSettings
from rotatord.errors import ConflictError
from tests.contract.conftest import fernet_ring

args = json.loads(sys.argv[1])
settings = AwsBackendSettings(kind="aws", region=args["region"], endpoint_url=args["url"],
    credentials_file=Path(args["creds"]), path_prefix=args["prefix"], timeout=timedelta(seconds=10),
    transient_retries=0)
backend = AwsBackend("racer", settings)
backend.read(args["path"])  # connect and warm up before the start signal
print("ready", flush=True)
sys.stdin.readline()
try:
    version = backend.write(args["path"], fernet_ring(version=2), expected=args["base"], request_id=args["rid"])
except ConflictError:
    print(json.dumps({"lost": args["rid"]}), flush=True)
else:
    print(json.dumps({"won": version}), flush=True)
"""


def test_concurrent_writers_in_separate_processes_exactly_one_wins(
    backend: AwsBackend, settings: AwsBackendSettings, sm: Any, moto_server: MotoServer
) -> None:
    """Across processes nothing serialises the writers: the label move alone is the CAS."""
    base = backend.write(PATH, fernet_ring(version=1), expected=None, request_id=uuid.uuid4().hex)
    args = {
        "region": REGION, "url": moto_server.url, "creds": str(settings.credentials_file),
        "prefix": settings.path_prefix, "path": PATH, "base": base,
    }  # fmt: skip
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, json.dumps({**args, "rid": uuid.uuid4().hex})],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        for racer in racers:
            assert racer.stdout is not None and racer.stdout.readline().strip() == "ready"
        for racer in racers:
            assert racer.stdin is not None
            racer.stdin.write("go\n")
            racer.stdin.flush()
        results = []
        for racer in racers:
            out, err = racer.communicate(timeout=60)
            assert racer.returncode == 0, err[-2000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
    winners = [r["won"] for r in results if "won" in r]
    assert len(winners) == 1 and sum("lost" in r for r in results) == 2
    name = name_of(settings)
    stages = describe_stages(moto_server, name)
    assert stages[winners[0]] == ["AWSCURRENT"] and stages[base] == ["AWSPREVIOUS"]
    # A loser that had already put its version leaves it unlabelled (AWS cannot delete a
    # version); it never carried AWSCURRENT and AWSPENDING is left on no version.
    assert all(labels == [] for v, labels in stages.items() if v not in (base, winners[0]))
    assert_sane_labels(moto_server, name)
    got = backend.read(PATH)
    assert got is not None and got.version == winners[0]


def test_crash_between_put_and_move_is_finished_by_the_same_request_id(
    backend: AwsBackend, settings: AwsBackendSettings, sm: Any, moto_server: MotoServer
) -> None:
    name = name_of(settings)
    v1 = backend.write(PATH, fernet_ring(version=1), expected=None, request_id=uuid.uuid4().hex)
    rid = uuid.uuid4().hex
    interrupted = fernet_ring(version=2, keys=2)
    # Exactly what a write killed after its put leaves behind.
    pending = version_id_for(rid, v1)
    sm.put_secret_value(
        SecretId=name, SecretString=dump_document(interrupted).decode(), ClientRequestToken=pending,
        VersionStages=["AWSPENDING"],
    )  # fmt: skip
    unpublished = backend.read(PATH)
    assert unpublished is not None and unpublished.version == v1
    assert [h.version for h in backend.history(PATH)] == [v1]  # not published, not history
    # The engine re-runs the step with the same request id (and, having generated again, a
    # different document): the pending version is promoted, no second one is made.
    retried = fernet_ring(version=2, keys=2)
    assert backend.write(PATH, retried, expected=v1, request_id=rid) == pending
    assert version_count(sm, name) == 2
    assert describe_stages(moto_server, name) == {v1: ["AWSPREVIOUS"], pending: ["AWSCURRENT"]}
    got = backend.read(PATH)
    assert got is not None
    assert (got.version, digest(got.document)) == (pending, digest(interrupted))  # versions are immutable
    assert backend.write(PATH, retried, expected=v1, request_id=rid) == pending
    assert version_count(sm, name) == 2


def test_crash_between_move_and_pending_removal_is_tidied_by_the_retry(
    backend: AwsBackend, settings: AwsBackendSettings, sm: Any, moto_server: MotoServer
) -> None:
    name = name_of(settings)
    v1 = backend.write(PATH, fernet_ring(version=1), expected=None, request_id=uuid.uuid4().hex)
    rid = uuid.uuid4().hex
    v2 = version_id_for(rid, v1)
    doc = fernet_ring(version=2, keys=2)
    sm.put_secret_value(
        SecretId=name, SecretString=dump_document(doc).decode(), ClientRequestToken=v2, VersionStages=["AWSPENDING"]
    )
    sm.update_secret_version_stage(SecretId=name, VersionStage="AWSCURRENT", MoveToVersionId=v2, RemoveFromVersionId=v1)
    assert sorted(labels_of(moto_server, name, v2)) == ["AWSCURRENT", "AWSPENDING"]
    assert backend.write(PATH, doc, expected=v1, request_id=rid) == v2
    assert labels_of(moto_server, name, v2) == ["AWSCURRENT"]
    assert version_count(sm, name) == 2


def test_stale_pending_of_an_abandoned_request_is_cleared(
    backend: AwsBackend, settings: AwsBackendSettings, sm: Any, moto_server: MotoServer
) -> None:
    name = name_of(settings)
    v1 = backend.write(PATH, fernet_ring(version=1), expected=None, request_id=uuid.uuid4().hex)
    abandoned = version_id_for(uuid.uuid4().hex, v1)
    sm.put_secret_value(
        SecretId=name, SecretString=dump_document(fernet_ring(version=2)).decode(), ClientRequestToken=abandoned,
        VersionStages=["AWSPENDING"],
    )  # fmt: skip
    doc = fernet_ring(version=2, keys=2)
    v2 = backend.write(PATH, doc, expected=v1, request_id=uuid.uuid4().hex)
    assert v2 != abandoned
    assert describe_stages(moto_server, name) == {v1: ["AWSPREVIOUS"], abandoned: [], v2: ["AWSCURRENT"]}
    got = backend.read(PATH)
    assert got is not None and digest(got.document) == digest(doc)


def test_pending_overtaken_by_another_writer_is_never_promoted(
    backend: AwsBackend, settings: AwsBackendSettings, sm: Any, moto_server: MotoServer
) -> None:
    """The same request id on a secret that moved on makes a new version from the new base, so a
    value computed from the old base cannot overwrite the other writer's change."""
    name = name_of(settings)
    v1 = backend.write(PATH, fernet_ring(version=1), expected=None, request_id=uuid.uuid4().hex)
    rid = uuid.uuid4().hex
    stale = version_id_for(rid, v1)
    sm.put_secret_value(
        SecretId=name, SecretString=dump_document(fernet_ring(version=2)).decode(), ClientRequestToken=stale,
        VersionStages=["AWSPENDING"],
    )  # fmt: skip
    v2 = backend.write(PATH, api_tokens(), expected=v1, request_id=uuid.uuid4().hex)  # the other writer
    doc = fernet_ring(version=3, keys=2)
    v3 = backend.write(PATH, doc, expected=v2, request_id=rid)
    assert v3 not in (stale, v2)
    got = backend.read(PATH)
    assert got is not None and (got.version, digest(got.document)) == (v3, digest(doc))
    assert labels_of(moto_server, name, stale) == []
    assert_sane_labels(moto_server, name)


def test_stale_expected_conflicts_before_anything_is_put(
    backend: AwsBackend, settings: AwsBackendSettings, sm: Any
) -> None:
    name = name_of(settings)
    v1 = backend.write(PATH, fernet_ring(version=1), expected=None, request_id=uuid.uuid4().hex)
    backend.write(PATH, fernet_ring(version=2), expected=v1, request_id=uuid.uuid4().hex)
    loser = fernet_ring(version=3)
    with pytest.raises(ConflictError) as info:
        backend.write(PATH, loser, expected=v1, request_id=uuid.uuid4().hex)
    assert not any(m in str(info.value) for m in materials(loser))
    assert version_count(sm, name) == 2
    with pytest.raises(ConflictError):
        backend.write("bots/none/key", loser, expected=v1, request_id=uuid.uuid4().hex)  # nothing there


def test_a_pre_created_empty_secret_gets_its_first_version(
    backend: AwsBackend, settings: AwsBackendSettings, sm: Any, moto_server: MotoServer
) -> None:
    """An operator may create the secret (tags, KMS key, resource policy) before rotatord fills it."""
    name = name_of(settings)
    sm.create_secret(Name=name, Tags=[{"Key": MANAGED_TAG[0], "Value": MANAGED_TAG[1]}])
    assert backend.read(PATH) is None
    doc = api_tokens()
    v1 = backend.write(PATH, doc, expected=None, request_id=uuid.uuid4().hex)
    assert describe_stages(moto_server, name) == {v1: ["AWSCURRENT"]}
    got = backend.read(PATH)
    assert got is not None and digest(got.document) == digest(doc)


# -- refusals ------------------------------------------------------------------------------------


def test_secret_without_the_tag_is_refused_unless_adopted(
    backend: AwsBackend, settings: AwsBackendSettings, sm: Any, moto_server: MotoServer
) -> None:
    name = name_of(settings)
    doc = fernet_ring(version=1)
    created = sm.create_secret(Name=name, SecretString=dump_document(doc).decode())["VersionId"]
    with pytest.raises(NotManaged) as info:
        backend.read(PATH)
    assert name in str(info.value) and "backends.aws.adopt_unmanaged" in str(info.value)
    with pytest.raises(NotManaged):
        backend.write(PATH, fernet_ring(version=2), expected=created, request_id=uuid.uuid4().hex)
    assert version_count(sm, name) == 1
    assert "Tags" not in sm.describe_secret(SecretId=name) or not sm.describe_secret(SecretId=name)["Tags"]

    adopter = AwsBackend("aws", settings.model_copy(update={"adopt_unmanaged": True}))
    try:
        got = adopter.read(PATH)
        assert got is not None and (got.version, digest(got.document)) == (created, digest(doc))
        new = adopter.write(PATH, fernet_ring(version=2), expected=created, request_id=uuid.uuid4().hex)
    finally:
        adopter.close()
    assert {"Key": MANAGED_TAG[0], "Value": MANAGED_TAG[1]} in sm.describe_secret(SecretId=name)["Tags"]
    again = backend.read(PATH)  # now rotatord's: the default settings accept it
    assert again is not None and again.version == new


@pytest.mark.parametrize(
    "value",
    [
        {"SecretString": '{"username": "app", "password": "hunter2-hunter2"}'},
        {"SecretString": "hunter2-hunter2"},
        {"SecretBinary": b"hunter2-hunter2"},
    ],
    ids=["json", "text", "binary"],
)
def test_a_value_that_is_not_a_rotatord_document_is_not_managed_even_when_adopting(
    settings: AwsBackendSettings, sm: Any, value: dict[str, Any]
) -> None:
    name = name_of(settings)
    created = sm.create_secret(Name=name, **value)["VersionId"]
    adopter = AwsBackend("aws", settings.model_copy(update={"adopt_unmanaged": True}))
    try:
        with pytest.raises(NotManaged) as info:
            adopter.read(PATH)
        assert "not a rotatord document" in str(info.value) and "hunter2" not in str(info.value)
    finally:
        adopter.close()
    assert [v["VersionId"] for v in sm.list_secret_version_ids(SecretId=name)["Versions"]] == [created]


def test_a_future_schema_is_document_invalid(backend: AwsBackend, settings: AwsBackendSettings, sm: Any) -> None:
    name = name_of(settings)
    future = json.loads(dump_document(fernet_ring()))
    future["schema"] = "rotatord/v9"
    sm.create_secret(
        Name=name, SecretString=json.dumps(future), Tags=[{"Key": MANAGED_TAG[0], "Value": MANAGED_TAG[1]}]
    )
    with pytest.raises(DocumentInvalid) as info:
        backend.read(PATH)
    assert "rotatord/v9" in str(info.value)
    assert not any(m in str(info.value) for m in materials(fernet_ring()))


def test_a_secret_scheduled_for_deletion_is_a_hard_stop(
    backend: AwsBackend, settings: AwsBackendSettings, sm: Any, moto_server: MotoServer
) -> None:
    name = name_of(settings)
    v1 = backend.write(PATH, fernet_ring(version=1), expected=None, request_id=uuid.uuid4().hex)
    sm.delete_secret(SecretId=name, RecoveryWindowInDays=7)
    for attempt in (
        lambda: backend.read(PATH),
        lambda: backend.write(PATH, fernet_ring(version=2), expected=v1, request_id=uuid.uuid4().hex),
    ):
        with pytest.raises(BackendError) as info:
            attempt()
        assert not info.value.transient and "scheduled for deletion" in str(info.value) and name in str(info.value)
    # moto would have accepted a put on the deleted secret; rotatord did not make one.
    assert list(describe_stages(moto_server, name)) == [v1]


def test_a_secret_with_lambda_rotation_enabled_is_refused(
    backend: AwsBackend, settings: AwsBackendSettings, sm: Any
) -> None:
    name = name_of(settings)
    backend.write(PATH, fernet_ring(version=1), expected=None, request_id=uuid.uuid4().hex)
    sm.rotate_secret(SecretId=name, RotationRules={"AutomaticallyAfterDays": 30}, RotateImmediately=False)
    before = version_count(sm, name)
    with pytest.raises(NotManaged) as info:
        backend.read(PATH)
    assert "rotation enabled" in str(info.value)
    assert version_count(sm, name) == before


# -- availability and errors -----------------------------------------------------------------------


def test_unreachable_endpoint_is_unavailable_after_bounded_retries(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = AwsBackendSettings(
        kind="aws", region=REGION, endpoint_url=url, credentials_file=write_credentials(tmp_path / "creds"),
        transient_retries=3,
    )  # fmt: skip
    delays: list[float] = []
    backend = AwsBackend("aws", settings, sleep=delays.append)
    try:
        with pytest.raises(BackendUnavailable) as info:
            backend.read(PATH)
        assert url in str(info.value) and "cannot reach" in str(info.value)
        assert len(delays) == 3
        for n, delay in enumerate(delays):  # 0.2 s doubling, jittered over the upper half
            assert 0.1 * 2**n <= delay <= 0.2 * 2**n
        with pytest.raises(BackendUnavailable):
            backend.check()
    finally:
        backend.close()


def test_paused_server_times_out_and_a_retry_inside_the_call_finishes_the_write(
    settings: AwsBackendSettings, sm: Any, moto_server: MotoServer
) -> None:
    """SIGSTOP: connections are accepted, never answered.  The retry's backoff resumes it."""
    quick = settings.model_copy(update={"timeout": timedelta(seconds=0.5), "transient_retries": 2})
    delays: list[float] = []

    def resume_during_backoff(delay: float) -> None:
        delays.append(delay)
        moto_server.resume()

    backend = AwsBackend("aws", quick, sleep=resume_during_backoff)
    try:
        v1 = backend.write(PATH, fernet_ring(version=1), expected=None, request_id=uuid.uuid4().hex)
        with moto_server.paused():
            v2 = backend.write(PATH, fernet_ring(version=2), expected=v1, request_id=uuid.uuid4().hex)
        assert len(delays) == 1
        impatient = AwsBackend("aws", quick.model_copy(update={"transient_retries": 0}))
        with moto_server.paused(), pytest.raises(BackendUnavailable) as info:
            impatient.read(PATH)
        assert "did not answer" in str(info.value)
    finally:
        backend.close()
        impatient.close()
    assert version_count(sm, name_of(settings)) == 2
    got = backend.read(PATH)
    assert got is not None and got.version == v2


def test_a_server_error_is_transient_and_retried(moto_server: MotoServer) -> None:
    """moto answers a version listing of a missing secret with a real HTTP 500."""
    import botocore.session

    session = botocore.session.Session()
    session.set_credentials("testing", "testing")
    delays: list[float] = []
    kv = SecretsManagerKV(region=REGION, endpoint_url=moto_server.url, session=session, retries=1, sleep=delays.append)
    try:
        with pytest.raises(BackendUnavailable) as info:
            kv.retrying(lambda: kv.versions(f"missing-{uuid.uuid4().hex}"), "list")
        assert "ListSecretVersionIds (500)" in str(info.value) and len(delays) == 1
    finally:
        kv.close()


def test_credentials_file_problems_are_config_errors_naming_the_field(
    settings: AwsBackendSettings, tmp_path: Path
) -> None:
    loose = write_credentials(tmp_path / "loose", ("AKIALOOSE", "loose-secret-value"))
    os.chmod(loose, 0o640)
    backend = AwsBackend("aws", settings.model_copy(update={"credentials_file": loose}))
    with pytest.raises(ConfigError) as info:
        backend.read(PATH)
    assert "backends.aws.credentials_file" in str(info.value) and "loose-secret-value" not in str(info.value)

    other = write_credentials(tmp_path / "other", ("AKIAOTHER", "other-secret-value"), profile="ci")
    backend = AwsBackend("aws", settings.model_copy(update={"credentials_file": other, "profile": "prod"}))
    with pytest.raises(ConfigError) as info:
        backend.read(PATH)
    assert "[prod]" in str(info.value) and "other-secret-value" not in str(info.value)
    with pytest.raises(ConfigError):
        load_shared_credentials(b"[default]\naws_access_key_id = x\n", None, "f")
    creds = load_shared_credentials(
        b"[ci]\naws_access_key_id = AKIA1\naws_secret_access_key = s3cr3t-v4lue\n", "ci", "f"
    )
    assert "s3cr3t-v4lue" not in repr(creds) and creds.secret_access_key.reveal() == "s3cr3t-v4lue"


def test_explicit_credentials_ignore_an_unknown_aws_profile_in_the_environment(
    backend: AwsBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    assert backend.read(PATH) is None
    backend.check()


# -- IAM: the shipped policies on a moto server that enforces them ------------------------------------


def _policy(name: str, *, only_secretsmanager: bool = True) -> dict[str, Any]:
    """A contrib policy as moto can evaluate it: Secrets Manager statements, Resource ``*``,
    no conditions (moto checks Secrets Manager actions against ``*`` and cannot evaluate them)."""
    policy = json.loads((REPO / "contrib" / "aws" / name).read_text())
    statements = []
    for statement in policy["Statement"]:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        if only_secretsmanager and not all(a.startswith("secretsmanager:") for a in actions):
            continue
        statements.append({"Effect": statement["Effect"], "Action": actions, "Resource": "*"})
    return {"Version": policy["Version"], "Statement": statements}


def test_shipped_policies_scope_every_statement() -> None:
    daemon = json.loads((REPO / "contrib" / "aws" / "rotatord-daemon-policy.json").read_text())
    bot = json.loads((REPO / "contrib" / "aws" / "rotatord-bot-readonly-policy.json").read_text())
    for policy in (daemon, bot):
        for statement in policy["Statement"]:
            assert statement["Effect"] == "Allow" and statement["Resource"] != "*"
            assert statement["Resource"].startswith(("arn:aws:secretsmanager:", "arn:aws:kms:"))
    bot_actions = {
        a for s in bot["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    }
    assert bot_actions == {"secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret", "kms:Decrypt"}


@pytest.fixture(scope="module")
def iam_moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MotoServer, dict[str, tuple[str, str]]]]:
    """A private moto server with users holding the shipped policies, enforcing IAM."""
    with start_moto(tmp_path_factory.mktemp("moto-iam")) as server:
        iam = server.client("iam")
        keys: dict[str, tuple[str, str]] = {}
        for user, policy in (
            ("rotatord", "rotatord-daemon-policy.json"),
            ("bot", "rotatord-bot-readonly-policy.json"),
        ):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName=policy, PolicyDocument=json.dumps(_policy(policy)))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        server.enforce_iam(True)
        yield server, keys


def test_daemon_policy_allows_the_whole_protocol_and_the_bot_policy_only_reading(
    iam_moto: tuple[MotoServer, dict[str, tuple[str, str]]], tmp_path: Path
) -> None:
    server, keys = iam_moto
    daemon_settings = aws_settings(server, tmp_path, path_prefix="rotatord")
    daemon = AwsBackend(
        "aws",
        daemon_settings.model_copy(update={"credentials_file": write_credentials(tmp_path / "d", keys["rotatord"])}),
    )
    daemon.check()
    v1 = daemon.write(PATH, fernet_ring(version=1), expected=None, request_id=uuid.uuid4().hex)
    doc = fernet_ring(version=2, keys=2)
    v2 = daemon.write(PATH, doc, expected=v1, request_id=uuid.uuid4().hex)
    assert [h.version for h in daemon.history(PATH)] == [v1, v2]

    import botocore.session

    session = botocore.session.Session()
    session.set_credentials(*keys["bot"])
    reader = AwsReader(f"rotatord/{PATH}", region=REGION, endpoint_url=server.url, session=session)
    assert digest(reader.read()) == digest(doc)
    bot = AwsBackend(
        "aws", daemon_settings.model_copy(update={"credentials_file": write_credentials(tmp_path / "b", keys["bot"])})
    )
    with pytest.raises(PermissionDenied) as info:
        bot.write(PATH, fernet_ring(version=3), expected=v2, request_id=uuid.uuid4().hex)
    assert "secretsmanager:PutSecretValue" in str(info.value)
    with pytest.raises(PermissionDenied):
        bot.history(PATH)  # ListSecretVersionIds is not the bot's
    assert [h.version for h in daemon.history(PATH)] == [v1, v2]  # the bot wrote nothing
    for b in (daemon, bot):
        b.close()
    reader.close()


@pytest.mark.parametrize("which", ["unknown-key", "wrong-secret"])
def test_rejected_credentials_are_permission_denied_without_echoing_them(
    iam_moto: tuple[MotoServer, dict[str, tuple[str, str]]], tmp_path: Path, which: str
) -> None:
    server, keys = iam_moto
    key = (
        ("AKIAUNKNOWNUNKNOWN00", "unknown-secret-key-value")
        if which == "unknown-key"
        else (keys["rotatord"][0], "wrong-secret-key-value")
    )
    settings = aws_settings(
        server, tmp_path, path_prefix="rotatord", credentials_file=write_credentials(tmp_path / "c", key)
    )
    backend = AwsBackend("aws", settings)
    try:
        for attempt in (backend.check, lambda: backend.read(PATH)):
            with pytest.raises(PermissionDenied) as info:
                attempt()
            assert "credentials were rejected" in str(info.value) and key[1] not in str(info.value)
    finally:
        backend.close()


# -- the bot's reader ----------------------------------------------------------------------------------


def test_reader_and_plain_botocore_read_the_same_current_document(
    backend: AwsBackend, settings: AwsBackendSettings, sm: Any, moto_server: MotoServer
) -> None:
    name = name_of(settings)
    one, two = fernet_ring(version=1), fernet_ring(version=2, keys=2)
    v1 = backend.write(PATH, one, expected=None, request_id=uuid.uuid4().hex)
    backend.write(PATH, two, expected=v1, request_id=uuid.uuid4().hex)

    import botocore.session

    session = botocore.session.Session()
    session.set_credentials("testing", "testing")
    reader = AwsReader(name, region=REGION, endpoint_url=moto_server.url, session=session)
    try:
        ring = reader.read()
        assert isinstance(ring, FernetRing) and digest(ring) == digest(two)
        assert digest(reader.read_version(v1)) == digest(one)  # the version a webhook named
        plain = parse_document(sm.get_secret_value(SecretId=name, VersionStage="AWSCURRENT")["SecretString"])
        assert digest(plain) == digest(two)
        with pytest.raises(BackendError) as info:
            AwsReader(f"{name}-missing", region=REGION, endpoint_url=moto_server.url, session=session).read()
        assert "does not exist" in str(info.value)
        with pytest.raises(BackendError):
            reader.read_version(version_id_for("nope", None))
    finally:
        reader.close()
    assert "testing" not in repr(reader)
