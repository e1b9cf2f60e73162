"""Who asks (identity), what they may see and do (roles, PrivateData), and admin writes
through the application, at the unit layer: libmunge's decode and Slurm's commands are
replaced by fakes here; tests/integration/test_identity_lab.py runs the real ones."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from slurm_quota import app, db, identity, roles, slurm
from slurm_quota.errors import CredentialRefused, NotAuthenticated, NotPermitted, SlurmUnavailable
from slurm_quota.slurm import RunResult

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "slurm-22.05" / "roles"
OUTPUTS = {
    ("scontrol", "show", "config"): "scontrol_show_config.txt",
    (
        "sacctmgr",
        "-n",
        "-P",
        "show",
        "user",
        "format=User,AdminLevel",
    ): "sacctmgr_show_user_adminlevel.txt",
    (
        "sacctmgr",
        "-n",
        "-P",
        "show",
        "account",
        "withcoord",
        "format=Account,Coordinators",
    ): "sacctmgr_show_account_withcoord.txt",
    (
        "sacctmgr",
        "-n",
        "-P",
        "show",
        "association",
        "format=User,Account",
    ): "sacctmgr_show_association.txt",
}


def fake_runner(argv, timeout_s):
    return RunResult(0, (FIXTURES / OUTPUTS[tuple(argv)]).read_text(), "")


def lab_view(**changes) -> roles.SlurmView:
    view = roles.load_view(fake_runner)
    if changes:
        view = roles.SlurmView(**{**view.__dict__, **changes})
    return view


def who(name: str | None, uid: int | None = 1000) -> identity.Identity:
    return identity.ANONYMOUS if name is None else identity.Identity(uid, name, "munge")


# ------------------------------------------------------------------ Slurm's answers


def test_slurm_view_is_parsed_from_the_lab_outputs():
    view = lab_view()
    assert view.slurm_user == "root"
    assert view.private_data == frozenset({"usage"})
    assert view.admin_levels["bob"] == "Operator"
    assert view.coordinators == {"physics": frozenset({"bob"})}
    assert view.associations["alice"] == frozenset({"physics", "research"})
    assert "" not in view.associations


def test_a_failing_sacctmgr_is_slurm_unavailable():
    def failing(argv, timeout_s):
        return RunResult(1, "", "sacctmgr: error: Problem talking to the database")

    with pytest.raises(SlurmUnavailable, match="Problem talking to the database"):
        slurm.admin_levels(runner=failing)


@pytest.mark.parametrize(
    ("value", "flags"),
    [
        ("none", frozenset()),
        ("usage", {"usage"}),
        ("accounts,jobs,usage", {"accounts", "jobs", "usage"}),
    ],
)
def test_private_data_flags(value, flags):
    assert roles.parse_private_data(value) == flags


# ------------------------------------------------------------------ roles


@pytest.mark.parametrize(
    ("name", "uid", "role"),
    [
        ("root", 0, roles.ADMIN),
        ("slurm", 64030, roles.ADMIN),  # SlurmUser
        ("carol", 1003, roles.USER),
        ("bob", 1002, roles.OPERATOR),
        ("alice", 1001, roles.USER),
    ],
)
def test_roles_come_from_slurm(name, uid, role):
    view = lab_view(slurm_user="slurm")
    assert roles.access_of(who(name, uid), view).role == role


def test_administrator_level_is_admin_and_coordinators_are_coordinators():
    view = lab_view(
        admin_levels={"alice": "Administrator"}, coordinators={"research": frozenset({"carol"})}
    )
    assert roles.access_of(who("alice"), view).role == roles.ADMIN
    carol = roles.access_of(who("carol"), view)
    assert carol.role == roles.COORDINATOR
    assert carol.users_of_coordinated == frozenset({"alice", "root"})


def test_a_ttl_of_zero_asks_slurm_every_time():
    calls = []
    cache = roles.Roles(0, load=lambda: calls.append(1) or lab_view(), clock=lambda: 5.0)
    assert cache.view().slurm_user == cache.view().slurm_user == "root"
    assert len(calls) == 2


def test_roles_are_asked_again_after_the_ttl_and_kept_when_slurm_fails():
    now = [0.0]
    calls = []

    def load():
        calls.append(now[0])
        if len(calls) >= 3:
            raise SlurmUnavailable("sacctmgr did not answer")
        return lab_view()

    cache = roles.Roles(60, load=load, clock=lambda: now[0])
    cache.view()
    now[0] = 59
    cache.view()
    assert calls == [0.0]
    now[0] = 61
    cache.view()
    now[0] = 130
    assert cache.view().slurm_user == "root"  # Slurm failed: the view of 61 s is kept
    now[0] = 135
    cache.view()
    assert len(calls) == 3  # not asked again within RETRY_S of the failure
    now[0] = 141
    cache.view()
    assert len(calls) == 4
    now[0] = 10_000
    with pytest.raises(SlurmUnavailable):
        cache.view()


# ------------------------------------------------------------------ privacy

PAYLOAD = {
    "users": [{"username": u} for u in ("alice", "bob", "root")],
    "accounts": [{"account": a} for a in ("physics", "research", "root")],
}


def test_without_private_data_everyone_sees_everyone():
    alice = roles.access_of(who("alice"), lab_view(private_data=frozenset({"jobs"})))
    assert roles.filter_payload(PAYLOAD, alice) is PAYLOAD
    roles.check_stats(alice, "bob", None)
    roles.check_metrics(alice)


def test_under_private_data_a_user_sees_their_row_and_their_accounts():
    alice = roles.access_of(who("alice"), lab_view())
    shown = roles.filter_payload(PAYLOAD, alice)
    assert [u["username"] for u in shown["users"]] == ["alice"]
    assert [a["account"] for a in shown["accounts"]] == ["physics", "research"]
    roles.check_stats(alice, "alice", None)
    with pytest.raises(NotPermitted, match="PrivateData=usage .* not user bob's"):
        roles.check_stats(alice, "bob", None)
    with pytest.raises(NotPermitted, match="not account root's"):
        roles.check_stats(alice, None, "root")
    with pytest.raises(NotPermitted, match="for Slurm operators and administrators"):
        roles.check_metrics(alice)


def test_under_private_data_a_coordinator_sees_their_accounts_users():
    view = lab_view(admin_levels={})
    bob = roles.access_of(who("bob"), view)
    assert bob.role == roles.COORDINATOR
    shown = roles.filter_payload(PAYLOAD, bob)
    assert [u["username"] for u in shown["users"]] == ["alice", "bob"]
    assert [a["account"] for a in shown["accounts"]] == ["physics"]


def test_under_private_data_operators_see_everything_and_anonymous_nothing():
    bob = roles.access_of(who("bob"), lab_view())
    assert roles.filter_payload(PAYLOAD, bob) is PAYLOAD
    anonymous = roles.access_of(identity.ANONYMOUS, lab_view())
    with pytest.raises(NotAuthenticated, match="must know who asks"):
        roles.check_stats(anonymous, None, None)


# ------------------------------------------------------------------ identity


def environ(method="GET", path="/stats", query="", body=b"", auth=None, **extra):
    env = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SCRIPT_NAME": "",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
    }
    if auth is not None:
        env["HTTP_AUTHORIZATION"] = auth
    env.update(extra)
    return env


@pytest.fixture
def fake_munge(monkeypatch):
    """decode() of 'CRED:<uid>:<payload>' (what munged would vouch for)."""

    def decode(credential, socket=None):
        if not credential.startswith("CRED:"):
            raise CredentialRefused("The MUNGE credential is not valid.")
        _, uid, payload = credential.split(":", 2)
        return int(uid), payload.encode()

    monkeypatch.setattr(identity, "decode", decode)
    return lambda uid, method, path_qs, body=b"": (
        f"MUNGE CRED:{uid}:{identity.request_payload(method, path_qs, body).decode()}"
    )


def test_a_credential_names_its_user(fake_munge):
    caller = identity.from_request(environ(auth=fake_munge(0, "GET", "/stats")), b"")
    assert (caller.uid, caller.name, caller.via) == (0, "root", "munge")


@pytest.mark.parametrize(
    ("method", "path_qs", "body"),
    [
        ("GET", "/stats?username=alice", b""),
        ("POST", "/stats", b""),
        ("GET", "/stats", b"x"),
    ],
)
def test_a_credential_for_another_request_is_refused(fake_munge, method, path_qs, body):
    env = environ(auth=fake_munge(0, method, path_qs, body))
    with pytest.raises(CredentialRefused, match="made for another request"):
        identity.from_request(env, b"")


def test_head_takes_the_credential_of_its_get(fake_munge):
    env = environ(method="HEAD", auth=fake_munge(0, "GET", "/stats"))
    assert identity.from_request(env, b"").name == "root"


def test_remote_user_only_when_trusted(fake_munge):
    env = environ(REMOTE_USER="alice")
    assert identity.from_request(env, b"") is identity.ANONYMOUS
    assert identity.from_request(env, b"", trust_remote_user=True).name == "alice"


def test_other_authorization_schemes_are_refused():
    with pytest.raises(CredentialRefused, match="Only `Authorization: MUNGE"):
        identity.from_request(environ(auth="Bearer abc"), b"")


# ------------------------------------------------------------------ the application


def call(application, env):
    seen = {}

    def start_response(status, headers):
        seen["status"] = int(status.split()[0])

    body = b"".join(application(env, start_response))
    return seen["status"], json.loads(body) if body else None


# The uids of these tests and their names: the service names a credential's uid through the
# passwd database, which on a fresh machine (or in the Python 3.9 tree) has no alice or bob.
PASSWD = {0: "root", 1001: "alice", 1002: "bob", 65534: "nobody"}
BOB = 1002


@pytest.fixture
def passwd(monkeypatch):
    monkeypatch.setattr(identity, "user_name", lambda uid: PASSWD.get(uid, f"uid {uid}"))


@pytest.fixture
def service(db_path, fake_munge, passwd):
    from slurm_quota import admin

    conn = db.connect(db_path)
    admin.set_quota(conn, "user", "alice", "cpu", 1000, actor="root")
    admin.set_quota(conn, "user", "bob", "cpu", 2000, actor="root")
    conn.close()
    view = lab_view()
    settings = app.Settings(db_path=db_path, roles=roles.Roles(load=lambda: view))
    return app.create_app(settings), fake_munge


def journal(db_path):
    conn = db.connect(db_path, readonly=True)
    try:
        return [
            tuple(r)
            for r in conn.execute(
                "SELECT actor, action, target, new_value FROM journal ORDER BY id"
            )
        ]
    finally:
        conn.close()


def test_stats_follow_private_data(service):
    application, cred = service
    assert call(application, environ())[0] == 401
    status, body = call(application, environ(auth=cred(1001, "GET", "/stats")))
    assert status == 200 and [u["username"] for u in body["users"]] == ["alice"]
    status, body = call(
        application, environ(query="username=bob", auth=cred(1001, "GET", "/stats?username=bob"))
    )
    assert status == 403 and "not user bob's" in body["message"]


def admin_post(cred, uid, command, args):
    body = json.dumps(args).encode()
    return environ(
        method="POST",
        path=f"/admin/{command}",
        body=body,
        auth=cred(uid, "POST", f"/admin/{command}", body),
    )


def test_an_operator_writes_through_the_service_journaled_as_them(service, db_path):
    application, cred = service
    status, body = call(
        application, admin_post(cred, BOB, "user-quota", {"name": "alice", "minutes": "4321"})
    )
    assert status == 200, body
    assert body["result"]["new_minutes"] == 4321
    assert journal(db_path)[-1] == ("bob", "set-quota", "alice", "4321")


def test_a_plain_users_write_is_refused_and_changes_nothing(service, db_path):
    application, cred = service
    before = journal(db_path)
    status, body = call(
        application, admin_post(cred, 65534, "user-quota", {"name": "alice", "minutes": "1"})
    )
    assert status == 403
    assert body["error"] == "NotPermitted" and body["exit_code"] == 1
    assert "Nothing was changed." in body["message"]
    status, body = call(
        application,
        environ(method="POST", path="/admin/user-quota", body=b'{"name": "alice", "minutes": "1"}'),
    )
    assert status == 401 and body["error"] == "NotAuthenticated"
    assert journal(db_path) == before


def test_bad_values_get_the_controllers_message_and_exit_code(service, db_path):
    application, cred = service
    before = journal(db_path)
    status, body = call(
        application, admin_post(cred, 0, "user-quota", {"name": "alice", "minutes": "12x"})
    )
    assert status == 400
    assert body == {
        "error": "InvalidInput",
        "exit_code": 2,
        "message": "Quota '12x' is not a whole number of minutes (use -1 for unlimited).",
    }
    status, body = call(
        application,
        admin_post(
            cred,
            0,
            "adjust",
            {
                "user": "alice",
                "account": None,
                "cpu": True,
                "gpu": True,
                "minutes": "+1",
                "hours": None,
                "reason": None,
            },
        ),
    )
    assert (status, body["message"]) == (400, "adjust needs exactly one of --cpu or --gpu.")
    assert journal(db_path) == before


def test_the_dashboard_shows_the_rows_of_a_trusted_remote_user(db_path):
    from slurm_quota import admin

    conn = db.connect(db_path)
    admin.set_quota(conn, "user", "alice", "cpu", 1000, actor="root")
    admin.set_quota(conn, "user", "bob", "cpu", 2000, actor="root")
    conn.close()
    view = lab_view()

    def page(trust: bool, **extra) -> tuple[int, str]:
        application = app.create_app(
            app.Settings(
                db_path=db_path, roles=roles.Roles(load=lambda: view), trust_remote_user=trust
            )
        )
        seen = {}

        def start_response(status, headers):
            seen["status"] = int(status.split()[0])

        html = b"".join(application(environ(path="/", **extra), start_response)).decode()
        return seen["status"], html

    status, html = page(True, REMOTE_USER="alice")
    assert status == 200
    assert ">alice<" in html and ">bob<" not in html
    status, html = page(False, REMOTE_USER="alice")  # not trusted: anonymous
    assert status == 401 and "PrivateData=usage" in html
    assert ">bob<" not in html
