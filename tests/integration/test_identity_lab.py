"""Who asks the service, on the real lab: MUNGE credentials from the lab's munged, roles from
its slurmdbd (sacctmgr), privacy from its slurm.conf (PrivateData=usage).

The service runs as root (the lab's SlurmUser) with --roles-ttl 0, so a role granted with
sacctmgr applies to the next request; users run the CLI from the checkout on the system's
python3, as a login node would.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import time

import pytest
import requests

from slurm_quota import db, identity
from tests import syspkgs
from tests.integration.lab import REPO

_LISTEN = re.compile(r"on http://127\.0\.0\.1:(\d+)/")


@pytest.fixture(scope="module")
def user_bin(lab) -> str:
    """The CLI as a non-root user runs it (the venv's interpreter is root's)."""
    if lab.chrooted:
        return lab.quota_bin  # already the tree's python3 with the checkout
    reason = syspkgs.ensure(["python3-click", "python3-tabulate", "python3-requests"])
    if reason:
        syspkgs.skip_or_fail(reason)
    path = lab.root / "bin" / "slurm-quota-user"
    path.write_text(
        "#!/usr/bin/python3\nimport sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from slurm_quota.entry import run\nsys.exit(run())\n"
    )
    path.chmod(0o755)
    return str(path)


@pytest.fixture(scope="module")
def service(lab):
    """`slurm-quota serve` as the lab's SlurmUser (root); yields its base URL."""
    argv = lab.in_chroot(
        [lab.quota_bin, "serve", "--port", "0", "--idle-timeout", "0", "--roles-ttl", "0", "-v"]
    )
    proc = subprocess.Popen(argv, env=lab._client_env(), stderr=subprocess.PIPE, text=True, cwd="/")
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        lines.append(first)
        m = _LISTEN.search(first)
        assert m, f"serve did not start: {first!r}"

        def drain() -> None:
            for line in proc.stderr:
                lines.append(line)

        threading.Thread(target=drain, daemon=True).start()
        yield f"http://127.0.0.1:{m.group(1)}/"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        print("".join(lines))


def cli(lab, user_bin: str, url: str, user: str, *args: str) -> subprocess.CompletedProcess:
    """slurm-quota as user, asking the service at url."""
    return lab.run("env", f"SLURM_QUOTA_URL={url}", user_bin, *args, user=user, check=False)


def stats_json(lab, user_bin, url, user, *args):
    proc = cli(lab, user_bin, url, user, "stats", "--url", url, "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@contextlib.contextmanager
def sacctmgr_grant(lab, grant: list[str], revoke: list[str]):
    lab.run("sacctmgr", "-i", *grant)
    try:
        yield
    finally:
        lab.run("sacctmgr", "-i", *revoke)


def ledger_state(lab) -> tuple:
    conn = db.connect(lab.ledger, readonly=True)
    try:
        tables = ("users", "accounts", "journal", "settings", "gpu_factors")
        return tuple(
            tuple(tuple(r) for r in conn.execute(f"SELECT * FROM {t} ORDER BY 1")) for t in tables
        )
    finally:
        conn.close()


@pytest.fixture
def ledger(lab, clean_ledger):
    """alice 1000 CPU min, bob 2000; accounts research and physics (set as root)."""
    for args in (
        ("user-quota", "alice", "1000"),
        ("user-quota", "bob", "2000"),
        ("account-quota", "research", "5000"),
        ("account-quota", "physics", "6000"),
    ):
        lab.run(lab.quota_bin, *args)
    return lab


def test_the_lab_hides_usage(lab):
    out = lab.run("scontrol", "show", "config").stdout
    assert re.search(r"^PrivateData\s*=\s*usage", out, re.M), out


def test_a_user_reads_their_own_usage_and_is_refused_anothers(ledger, user_bin, service):
    lab = ledger
    mine = stats_json(lab, user_bin, service, "alice")
    assert [u["username"] for u in mine["users"]] == ["alice"]
    everything = stats_json(lab, user_bin, service, "alice", "--all")
    assert [u["username"] for u in everything["users"]] == ["alice"]
    assert sorted(a["account"] for a in everything["accounts"]) == ["physics", "research"]

    refused = cli(lab, user_bin, service, "alice", "stats", "--url", service, "bob")
    print(f"$ slurm-quota stats bob   # as alice\n{refused.stderr}(exit {refused.returncode})")
    assert refused.returncode == 1
    assert "PrivateData=usage in slurm.conf: alice (user) may see their own usage" in (
        refused.stderr
    )
    assert "not user bob's" in refused.stderr
    assert refused.stdout == ""
    other = cli(lab, user_bin, service, "alice", "stats", "--url", service, "--account", "root")
    assert other.returncode == 1 and "not account root's" in other.stderr


def test_anonymous_requests_are_refused_under_private_data(ledger, service):
    resp = requests.get(service + "stats", timeout=10)
    assert resp.status_code == 401
    assert "PrivateData=usage" in resp.json()["message"]
    assert requests.get(service + "metrics", timeout=10).status_code == 401
    assert requests.get(service + "health", timeout=10).status_code == 200


def test_a_coordinator_sees_the_users_of_their_account(ledger, user_bin, service):
    lab = ledger
    assert cli(lab, user_bin, service, "bob", "stats", "--url", service, "alice").returncode == 1
    with sacctmgr_grant(
        lab,
        ["add", "coordinator", "account=physics", "names=bob"],
        ["remove", "coordinator", "account=physics", "names=bob"],
    ):
        seen = stats_json(lab, user_bin, service, "bob", "--all")
        # alice has an association with physics; root has none there.
        assert sorted(u["username"] for u in seen["users"]) == ["alice", "bob"]
        assert [a["account"] for a in seen["accounts"]] == ["physics"]
        alice = stats_json(lab, user_bin, service, "bob", "alice")
        assert [u["username"] for u in alice["users"]] == ["alice"]
        # alice's other account is not bob's to see.
        refused = cli(
            lab, user_bin, service, "bob", "stats", "--url", service, "--account", "research"
        )
        assert refused.returncode == 1
        assert "the users of the accounts they coordinate, not account research's" in (
            refused.stderr
        )


def test_an_operator_sets_a_quota_from_a_non_root_shell(ledger, user_bin, service):
    lab = ledger
    with sacctmgr_grant(
        lab,
        ["modify", "user", "bob", "set", "adminlevel=operator"],
        ["modify", "user", "bob", "set", "adminlevel=none"],
    ):
        done = cli(
            lab, user_bin, service, "bob", "user-quota", "alice", "4321", "--reason", "PI request"
        )
        print(
            f"$ slurm-quota user-quota alice 4321 --reason 'PI request'   # as bob\n"
            f"{done.stdout}{done.stderr}(exit {done.returncode})"
        )
        assert (done.returncode, done.stderr) == (0, "")
        assert done.stdout == "User alice: CPU quota 1000 minutes -> 4321 minutes.\n"
        history = lab.run(lab.quota_bin, "history", "--user", "alice", "--limit", "1").stdout
        print(f"$ slurm-quota history --user alice --limit 1\n{history}")
        bad = cli(lab, user_bin, service, "bob", "user-quota", "alice", "12x")
        assert bad.returncode == 2
        assert bad.stderr == (
            "slurm-quota: error: Quota '12x' is not a whole number of minutes "
            "(use -1 for unlimited).\n"
        )
    conn = db.connect(lab.ledger, readonly=True)
    try:
        rows = conn.execute(
            "SELECT actor, action, target, old_value, new_value, reason FROM journal "
            "ORDER BY id DESC LIMIT 1"
        ).fetchall()
    finally:
        conn.close()
    assert [tuple(r) for r in rows] == [("bob", "set-quota", "alice", "1000", "4321", "PI request")]
    assert "by bob: PI request" in history
    # Root on the controller still writes directly, with the same message.
    root = lab.run(lab.quota_bin, "user-quota", "alice", "1000")
    assert root.stdout == "User alice: CPU quota 4321 minutes -> 1000 minutes.\n"


def test_a_plain_users_write_is_refused_and_the_ledger_unchanged(ledger, user_bin, service):
    lab = ledger
    before = ledger_state(lab)
    for args in (
        ["user-quota", "alice", "99999"],
        ["adjust", "--user", "alice", "--cpu", "--minutes=-30"],
        ["set-gpu-factor", "h100", "0"],
        ["set-default-quotas", "--user-cpu", "5"],
        ["set-setting", "node_gpus", "gpu:9"],
    ):
        proc = cli(lab, user_bin, service, "alice", *args)
        if args[0] == "user-quota":
            print(
                f"$ slurm-quota {' '.join(args)}   # as alice\n{proc.stderr}"
                f"(exit {proc.returncode})"
            )
        assert proc.returncode == 1, proc
        assert (
            f"`slurm-quota {args[0]}` changes the ledger and is restricted to Slurm "
            "administrators and operators" in proc.stderr
        )
        assert "you are alice (user). Nothing was changed." in proc.stderr
    assert ledger_state(lab) == before


def _credential(lab, user: str, payload: bytes, ttl_s: int = 60) -> str:
    proc = lab.run(
        "munge", "-S", str(lab.munge_socket), "-t", str(ttl_s), "-s", payload.decode(), user=user
    )
    return proc.stdout.strip()


def _get(url: str, path_qs: str, credential: str) -> requests.Response:
    return requests.get(
        url.rstrip("/") + path_qs, timeout=10, headers={"Authorization": f"MUNGE {credential}"}
    )


def test_forged_replayed_expired_and_misused_credentials_are_refused(ledger, service):
    lab = ledger
    path = "/stats?username=alice"
    payload = identity.request_payload("GET", path, b"")
    good = _credential(lab, "alice", payload)
    first = _get(service, path, good)
    assert first.status_code == 200, first.text
    assert [u["username"] for u in first.json()["users"]] == ["alice"]

    seen = {}
    seen["replayed"] = _get(service, path, good)
    fresh = _credential(lab, "alice", payload)
    seen["forged"] = _get(
        service, path, fresh[:30] + ("A" if fresh[30] != "A" else "B") + fresh[31:]
    )
    short = _credential(lab, "alice", payload, ttl_s=1)
    time.sleep(3)
    seen["expired"] = _get(service, path, short)
    # A credential of alice's own request, sent for bob's usage.
    seen["another request"] = _get(
        service, "/stats?username=bob", _credential(lab, "alice", payload)
    )
    for what, resp in seen.items():
        print(f"{what}: HTTP {resp.status_code} {resp.text.strip()}")
        assert resp.status_code == 401, (what, resp.text)
        assert resp.json()["error"] == "unauthorized"
    assert "used before" in seen["replayed"].json()["message"]
    assert "not valid" in seen["forged"].json()["message"]
    assert "expired" in seen["expired"].json()["message"]
    assert "made for another request" in seen["another request"].json()["message"]


def test_a_replayed_write_changes_nothing(ledger, service):
    lab = ledger
    body = json.dumps({"name": "alice", "minutes": "7", "reason": None}, sort_keys=True).encode()
    path = "/admin/user-quota"
    cred = lab.run(
        "munge",
        "-S",
        str(lab.munge_socket),
        "-s",
        identity.request_payload("POST", path, body).decode(),
    ).stdout.strip()
    headers = {"Authorization": f"MUNGE {cred}", "Content-Type": "application/json"}
    assert (
        requests.post(
            service.rstrip("/") + path, data=body, headers=headers, timeout=10
        ).status_code
        == 200
    )
    before = ledger_state(lab)
    again = requests.post(service.rstrip("/") + path, data=body, headers=headers, timeout=10)
    assert again.status_code == 401
    assert again.json()["error"] == "CredentialRefused"
    other = json.dumps({"name": "bob", "minutes": "7", "reason": None}).encode()
    fresh = lab.run(
        "munge",
        "-S",
        str(lab.munge_socket),
        "-s",
        identity.request_payload("POST", path, body).decode(),
    ).stdout.strip()
    misused = requests.post(
        service.rstrip("/") + path,
        data=other,
        timeout=10,
        headers={"Authorization": f"MUNGE {fresh}"},
    )
    assert misused.status_code == 401
    assert ledger_state(lab) == before


def test_root_on_the_controller_writes_directly(ledger):
    # Root never asks the service: a write works with no service at the address.
    lab = ledger
    proc = lab.run(
        "env", "SLURM_QUOTA_URL=http://127.0.0.1:9/", lab.quota_bin, "user-quota", "bob", "77"
    )
    assert proc.stdout == "User bob: CPU quota 2000 minutes -> 77 minutes.\n"
    last = lab.run(lab.quota_bin, "history", "--user", "bob", "--json", "--limit", "1").stdout
    assert json.loads(last)[0]["actor"] == "root"
