"""The application `slurm-quota serve` runs: routes, JSON errors, caching, concurrency.

Called in this process through wsgiref's validator; the server around it (waitress, socket
activation, idle exit, hostile clients) is tested on the real process in
test_serve_process.py and tests/integration/test_serve_hostile.py.
"""

from __future__ import annotations

import gzip
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from slurm_quota import app, db, readmodel, stats
from slurm_quota.errors import InvalidInput
from tests.web.readside import (
    ACCOUNTS_OF,
    EXPECTED_ACCOUNTS,
    EXPECTED_USERS,
    SEED_ACCOUNT_KEYS,
    SEED_USER_KEYS,
    local_app,
    numbers,
    seed_ledger,
    wsgi_request,
)


@pytest.fixture
def service(db_path):
    seed_ledger(db_path)
    return local_app(db_path)


def request(service, method: str, target: str, headers: dict | None = None):
    """One request: (status, lower-case headers, body bytes)."""
    return wsgi_request(service, method, target, headers)


def get_json(service, target: str):
    status, headers, body = request(service, "GET", target)
    assert headers["content-type"] == "application/json"
    return status, json.loads(body)


# --- routes ----------------------------------------------------------------------------


def test_health_reports_ok_and_schema_version(service):
    status, body = get_json(service, "/health")
    assert status == 200
    assert body == {"status": "ok", "schema_version": db.latest_version()}


def test_stats_json_shape_key_by_key_against_the_seed_list(service):
    status, body = get_json(service, "/stats")
    assert status == 200
    assert list(body)[:2] == ["users", "accounts"]
    assert body["users"] and body["accounts"]
    for row in body["users"]:
        for i, key in enumerate(SEED_USER_KEYS):
            assert list(row)[i] == key
    for row in body["accounts"]:
        for i, key in enumerate(SEED_ACCOUNT_KEYS):
            assert list(row)[i] == key
    alice = body["users"][0]
    for key in SEED_USER_KEYS[1:]:
        if key != "last_updated":
            assert isinstance(alice[key], int), key
    assert isinstance(alice["last_updated"], str)


def test_stats_values_computed_from_the_seeded_ledger(service):
    _, body = get_json(service, "/stats")
    assert [r["username"] for r in body["users"]] == sorted(EXPECTED_USERS)
    assert {r["username"]: numbers(r) for r in body["users"]} == EXPECTED_USERS
    assert {r["account"]: numbers(r) for r in body["accounts"]} == EXPECTED_ACCOUNTS


@pytest.mark.parametrize("user", sorted(ACCOUNTS_OF))
def test_stats_username_filter(service, user):
    status, body = get_json(service, f"/stats?username={user}")
    assert status == 200
    assert [r["username"] for r in body["users"]] == [user]
    assert numbers(body["users"][0]) == EXPECTED_USERS[user]
    assert [r["account"] for r in body["accounts"]] == ACCOUNTS_OF[user]


def test_stats_account_filter_returns_that_account_only(service):
    status, body = get_json(service, "/stats?account=phys")
    assert status == 200
    assert body["users"] == []
    assert [(r["account"], numbers(r)) for r in body["accounts"]] == [
        ("phys", EXPECTED_ACCOUNTS["phys"])
    ]


def test_stats_percent_encoded_names_are_decoded(db_path):
    conn = db.connect(db_path)
    conn.execute("INSERT INTO users (username) VALUES ('jean pierre&co')")
    conn.close()
    status, body = get_json(local_app(db_path), "/stats?username=jean%20pierre%26co")
    assert status == 200
    assert [r["username"] for r in body["users"]] == ["jean pierre&co"]


def test_unknown_user_gives_empty_lists_not_an_error(service):
    assert get_json(service, "/stats?username=zed") == (200, {"users": [], "accounts": []})


@pytest.mark.parametrize(
    "target",
    [
        "/stats?username=alice&account=hpc",  # mutually exclusive
        "/stats?user=alice",  # unknown parameter: must not silently answer everybody
        "/stats?username=alice&username=bob",  # repeated
        "/stats?username=",  # empty
        "/stats?username",  # no '='
        "/stats?username=%ff",  # not UTF-8
        "/health?verbose=1",
        "/metrics?x=1",
    ],
)
def test_malformed_queries_get_400_json(service, target):
    status, body = get_json(service, target)
    assert status == 400
    assert body["error"] == "bad_request"
    assert body["message"]
    assert "Traceback" not in body["message"]


@pytest.mark.parametrize("target", ["/nope", "/stats/extra", "/statsx", "/health.json"])
def test_unknown_paths_get_404_not_found(service, target):
    status, body = get_json(service, target)
    assert status == 404
    assert body["error"] == "not_found"


def test_trailing_slash_is_the_same_route(service):
    assert get_json(service, "/stats/?account=hpc")[1]["accounts"][0]["account"] == "hpc"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "FOO"])
def test_non_get_methods_get_405_with_allow(service, method):
    status, headers, body = request(service, method, "/stats")
    assert status == 405
    assert headers["allow"] == "GET, HEAD"
    assert json.loads(body)["error"] == "method_not_allowed"


def test_head_sends_headers_without_body(service):
    status, headers, body = request(service, "HEAD", "/health")
    assert status == 200
    assert int(headers["content-length"]) > 0
    assert body == b""


def test_metrics_content_type_and_values(service):
    status, headers, body = request(service, "GET", "/metrics")
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    lines = body.decode().splitlines()
    assert 'slurm_quota_user_preallocated_minutes{username="bob",resource="cpu"} 307' in lines
    assert "# TYPE slurm_quota_charges_total counter" in lines


def test_large_answers_are_gzipped_when_asked(db_path):
    conn = db.connect(db_path)
    conn.executemany(
        "INSERT INTO users (username) VALUES (?)", [(f"user{i:04d}",) for i in range(200)]
    )
    conn.close()
    url = local_app(db_path)
    status, headers, body = request(url, "GET", "/stats", {"Accept-Encoding": "gzip"})
    plain = request(url, "GET", "/stats")[2]
    assert status == 200
    assert headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(body)) == json.loads(plain)
    assert len(json.loads(plain)["users"]) == 200


def test_whole_ledger_answers_follow_writes(service, db_path):
    before = get_json(service, "/stats")[1]
    metrics_before = request(service, "GET", "/metrics")[2]
    conn = db.connect(db_path)
    conn.execute("UPDATE users SET total_consumed_cpu_minutes = 4321 WHERE username = 'carol'")
    conn.execute("INSERT INTO accounts (account) VALUES ('zoo')")
    conn.close()
    after = get_json(service, "/stats")[1]
    assert before != after
    carol = next(r for r in after["users"] if r["username"] == "carol")
    assert carol["total_consumed_cpu_minutes"] == 4321
    assert after["accounts"][-1]["account"] == "zoo"
    metrics_after = request(service, "GET", "/metrics")[2].decode().splitlines()
    assert metrics_after != metrics_before.decode().splitlines()
    assert 'slurm_quota_user_consumed_minutes{username="carol",resource="cpu"} 4321' in (
        metrics_after
    )


def test_missing_database_gives_503_json(tmp_path):
    url = local_app(tmp_path / "absent.db")
    for target in ("/health", "/stats", "/stats?username=a", "/metrics"):
        status, body = get_json(url, target)
        assert status == 503, target
        assert body["error"] == "unavailable"
        assert "does not exist" in body["message"]


def test_database_with_another_schema_gives_503_json(db_path):
    conn = db.connect(db_path)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    status, body = get_json(local_app(db_path), "/stats")
    assert status == 503
    assert "schema version 999" in body["message"]


def test_database_locked_past_the_bound_gives_503(db_path, monkeypatch):
    monkeypatch.setattr(readmodel, "READ_BUSY_TIMEOUT_MS", 50)
    writer = db.connect(db_path)
    writer.execute("PRAGMA journal_mode = DELETE")  # rollback journal: a writer blocks readers
    writer.execute("BEGIN EXCLUSIVE")
    try:
        status, body = get_json(local_app(db_path), "/stats?username=alice")
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert status == 503
    assert body["error"] == "unavailable"


def test_internal_errors_are_json_500_without_traceback(service, monkeypatch):
    def boom(*_a, **_k):
        raise RuntimeError("secret detail")

    monkeypatch.setattr(stats, "stats_payload", boom)
    status, body = get_json(service, "/stats?username=alice")
    assert status == 500
    assert body == {"error": "internal", "message": "Internal error; see the service log."}


def test_the_server_never_writes_the_ledger(service, db_path):
    from tests.unit.cli_helpers import snapshot

    before = snapshot(db_path)
    for target in ("/stats", "/stats?username=alice", "/stats?account=hpc", "/metrics", "/health"):
        assert request(service, "GET", target)[0] == 200
    assert snapshot(db_path) == before


# --- concurrency -----------------------------------------------------------------------


def test_one_hundred_parallel_clients_all_get_their_own_correct_answer(service):
    users = sorted(EXPECTED_USERS)
    targets = [f"/stats?username={users[i % len(users)]}" for i in range(100)]
    barrier = threading.Barrier(100)

    def client(target):
        barrier.wait()
        return target, get_json(service, target)

    with ThreadPoolExecutor(max_workers=100) as pool:
        results = list(pool.map(client, targets))
    assert len(results) == 100
    for target, (status, body) in results:
        user = target.rsplit("=", 1)[1]
        assert status == 200
        assert [r["username"] for r in body["users"]] == [user]
        assert numbers(body["users"][0]) == EXPECTED_USERS[user]
        assert [r["account"] for r in body["accounts"]] == ACCOUNTS_OF[user]


def test_parallel_clients_on_whole_ledger_routes_get_identical_answers(service):
    barrier = threading.Barrier(40)

    def client(i):
        barrier.wait()
        target = "/stats" if i % 2 else "/metrics"
        return target, request(service, "GET", target)

    with ThreadPoolExecutor(max_workers=40) as pool:
        results = list(pool.map(client, range(40)))
    bodies = {}
    for target, (status, _h, body) in results:
        assert status == 200
        bodies.setdefault(target, set()).add(body)
    assert {t: len(b) for t, b in bodies.items()} == {"/stats": 1, "/metrics": 1}


# --- query parsing (unit) --------------------------------------------------------------


def test_parse_query_accepts_known_parameters_once():
    assert app.parse_query("/stats", "username=al%20ice") == {"username": "al ice"}
    assert app.parse_query("/stats", "") == {}
    with pytest.raises(InvalidInput, match="longer than 256"):
        app.parse_query("/stats", "username=" + "a" * 300)


def test_a_replaced_database_file_is_reopened(service, db_path, tmp_path):
    assert get_json(service, "/stats")[1]["users"]  # cached, pooled connections open
    fresh = tmp_path / "restored.db"
    db.migrate(fresh)
    conn = db.connect(fresh)
    conn.execute("INSERT INTO users (username) VALUES ('restored')")
    conn.close()
    for suffix in ("-wal", "-shm"):
        if (tmp_path / f"restored.db{suffix}").exists():
            (tmp_path / f"restored.db{suffix}").unlink()
    for suffix in ("-wal", "-shm"):
        if db_path.with_name(db_path.name + suffix).exists():
            db_path.with_name(db_path.name + suffix).unlink()
    fresh.replace(db_path)
    assert [r["username"] for r in get_json(service, "/stats")[1]["users"]] == ["restored"]
    assert get_json(service, "/stats?username=alice")[1] == {"users": [], "accounts": []}


def _rebuild_under_way(model, first):
    """Change the ledger, start a build that waits for release; (thread, calls, release)."""
    calls, release = [], threading.Event()

    def slow_build():
        calls.append(1)
        release.wait(10)
        return readmodel.json_response(200, {"n": len(calls)})

    conn = db.connect(model.db_path)
    conn.execute("INSERT INTO users (username) VALUES ('new')")  # the ledger changed
    conn.close()
    rebuilding = threading.Thread(target=model.cached, args=("stats", slow_build))
    rebuilding.start()
    while not calls:
        threading.Event().wait(0.01)
    return rebuilding, calls, release, slow_build


def test_readers_arriving_during_a_rebuild_wait_for_it_and_it_is_built_once(db_path):
    model = readmodel.ReadModel(db_path)
    first = model.cached("stats", lambda: readmodel.json_response(200, {"n": 0}))
    rebuilding, calls, release, slow_build = _rebuild_under_way(model, first)
    got = []
    reader = threading.Thread(target=lambda: got.append(model.cached("stats", slow_build)))
    reader.start()
    reader.join(0.3)
    assert got == []  # waits: its answer must hold the change made before it asked
    release.set()
    rebuilding.join(10)
    reader.join(10)
    assert json.loads(got[0].body) == {"n": 1}
    assert len(calls) == 1
    model.close()


def test_under_max_stale_a_recent_answer_is_sent_and_the_fresh_one_built_behind_it(db_path):
    model = readmodel.ReadModel(db_path, max_stale_s=60)
    first = model.cached("stats", lambda: readmodel.json_response(200, {"n": 0}))
    rebuilding, calls, release, slow_build = _rebuild_under_way(model, first)
    rebuilding.join(5)
    assert not rebuilding.is_alive()  # the asker got the recent copy, not the build
    assert model.cached("stats", slow_build) is first  # meanwhile: the copy, no second build
    release.set()
    for _ in range(500):  # the build behind finishes; the next asker gets its answer
        answer = model.cached("stats", slow_build)
        if answer is not first:
            break
        threading.Event().wait(0.01)
    assert json.loads(answer.body) == {"n": 1}
    assert len(calls) == 1
    model.close()


def test_the_dashboard_is_served_at_the_root_from_the_ledger(service):
    status, headers, body = request(service, "GET", "/")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert 'data-name="alice"' in body.decode()
    assert request(service, "GET", "/static/style.css")[0] == 200
    assert request(service, "GET", "/static/../app.py")[0] == 404
