"""Entity tags on the whole-ledger answers: `ETag`, `If-None-Match` → 304 while the ledger
gives the same bytes, and the clients that use them (`fetch_stats(cache=...)`, the dashboard).

Against the real server in a thread, with its builder process, and without one.
"""

from __future__ import annotations

import gzip
import http.client
import json
import re
from urllib.parse import urlsplit

import pytest

from slurm_quota import db, serve, stats
from slurm_quota import web as dashboard
from tests.web.readside import EXPECTED_USERS, numbers, seed_ledger, server_thread

TAG = re.compile(r'"[0-9a-f]{24}"')


@pytest.fixture
def seeded(db_path):
    """The seeded ledger plus 40 users: /stats and /metrics are large enough to be gzipped."""
    seed_ledger(db_path)
    conn = db.connect(db_path)
    with db.write_transaction(conn):
        conn.executemany("INSERT INTO users (username) VALUES (?)",
                         [(f"extra{i:02d}",) for i in range(40)])
    conn.close()
    assert len(serve.App(serve.ReadModel(db_path)).handle("/stats").body) > serve.GZIP_MIN_BYTES
    return db_path


@pytest.fixture(params=[True, False], ids=["builder", "in-loop"])
def url(request, seeded):
    with server_thread(seeded, builder=request.param) as base:
        yield base


def request(base: str, path: str, *headers: tuple[str, str], method: str = "GET",
            conn: http.client.HTTPConnection | None = None):
    """(status, headers as a dict, body) of one request, on conn when given (kept open)."""
    own = conn is None
    if conn is None:
        conn = http.client.HTTPConnection(urlsplit(base).hostname, urlsplit(base).port,
                                          timeout=10)
    try:
        conn.request(method, path, headers=dict(headers))
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        if own:
            conn.close()


def write(db_path, sql: str) -> None:
    conn = db.connect(db_path)
    with db.write_transaction(conn):
        conn.execute(sql)
    conn.close()


@pytest.mark.parametrize("path", ["/stats", "/metrics"])
def test_whole_ledger_answers_carry_an_entity_tag_per_encoding(url, path):
    status, plain_headers, plain = request(url, path)
    assert status == 200
    assert TAG.fullmatch(plain_headers["etag"])
    assert plain_headers["cache-control"] == "no-cache"
    status, zipped_headers, zipped = request(url, path, ("Accept-Encoding", "gzip"))
    assert status == 200
    assert zipped_headers["content-encoding"] == "gzip"
    assert gzip.decompress(zipped) == plain
    assert zipped_headers["etag"] == plain_headers["etag"][:-1] + '-gzip"'
    assert request(url, path)[1]["etag"] == plain_headers["etag"]  # stable while unchanged


def test_the_tag_back_gets_304_without_a_body_and_the_connection_goes_on(url):
    _status, headers, _body = request(url, "/stats")
    host = urlsplit(url)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=10)
    try:
        status, again, body = request(url, "/stats", ("If-None-Match", headers["etag"]),
                                      conn=conn)
        assert (status, body) == (304, b"")
        assert again["etag"] == headers["etag"]
        assert "content-length" not in again and "content-type" not in again
        # The same connection: a 304 has no body, so the next answer is framed right.
        status, _h, body = request(url, "/stats?username=alice", conn=conn)
        assert status == 200
        assert numbers(json.loads(body)["users"][0]) == EXPECTED_USERS["alice"]
    finally:
        conn.close()


@pytest.mark.parametrize(
    "form",
    [
        "{tag}",
        "W/{tag}",
        '"0000", {tag}',
        "{gzip_tag}",  # the copy the client holds is the gzipped one
        "*",
    ],
)
def test_if_none_match_forms_that_name_the_answer(url, form):
    tag = request(url, "/stats")[1]["etag"]
    value = form.format(tag=tag, gzip_tag=tag[:-1] + '-gzip"')
    assert request(url, "/stats", ("If-None-Match", value))[0] == 304
    status, headers, _body = request(
        url, "/stats", ("If-None-Match", value), ("Accept-Encoding", "gzip")
    )
    assert status == 304
    assert headers["etag"] == tag[:-1] + '-gzip"'  # the tag of what a 200 would have sent


@pytest.mark.parametrize("value", ['"0000"', "W/\"0000\", \"1111\"", "", "garbage"])
def test_a_tag_that_does_not_name_the_answer_gets_it_all(url, value):
    status, _headers, body = request(url, "/stats", ("If-None-Match", value))
    assert status == 200
    assert set(EXPECTED_USERS) < {r["username"] for r in json.loads(body)["users"]}


def test_after_a_write_the_old_tag_gets_the_new_ledger(url, seeded):
    tag = request(url, "/stats")[1]["etag"]
    write(seeded, "UPDATE users SET quota_cpu_minutes = 7777 WHERE username = 'carol'")
    status, headers, body = request(url, "/stats", ("If-None-Match", tag))
    assert status == 200
    assert headers["etag"] != tag
    carol = next(r for r in json.loads(body)["users"] if r["username"] == "carol")
    assert carol["quota_cpu_minutes"] == 7777
    # Put back: the same bytes again, so the same tag (it hashes the bytes).
    write(seeded, "UPDATE users SET quota_cpu_minutes = -1 WHERE username = 'carol'")
    assert request(url, "/stats")[1]["etag"] == tag


def test_head_with_the_tag_gets_304(url):
    tag = request(url, "/metrics")[1]["etag"]
    status, _headers, body = request(url, "/metrics", ("If-None-Match", tag), method="HEAD")
    assert (status, body) == (304, b"")


@pytest.mark.parametrize("path", ["/stats?username=alice", "/stats?account=hpc", "/health"])
def test_answers_built_per_request_have_no_tag_and_ignore_if_none_match(url, path):
    status, headers, _body = request(url, path, ("If-None-Match", "*"))
    assert status == 200
    assert "etag" not in headers
    assert headers["cache-control"] == "no-store"


def test_an_error_answer_has_no_tag(tmp_path):
    missing = tmp_path / "missing.db"
    with server_thread(missing) as base:
        status, headers, _body = request(base, "/stats", ("If-None-Match", "*"))
    assert status == 503
    assert "etag" not in headers


def test_builder_and_in_loop_builds_give_the_same_tag(seeded):
    tags = []
    for builder in (True, False):
        with server_thread(seeded, builder=builder) as base:
            tags.append(request(base, "/stats")[1]["etag"])
    inline = serve.App(serve.ReadModel(seeded)).handle("/stats")
    assert isinstance(inline, serve.Response)
    assert tags == [inline.etag, inline.etag]


@pytest.mark.parametrize(
    "header, etag, expected",
    [
        ('"abc"', '"abc"', True),
        ('W/"abc"', '"abc"', True),
        ('"abc-gzip"', '"abc"', True),
        ('"x", "abc"', '"abc"', True),
        (" * ", '"abc"', True),
        ('"abcd"', '"abc"', False),
        ('"ab"', '"abc"', False),
        ("", '"abc"', False),
        ('"abc-gzip-gzip"', '"abc"', False),
    ],
)
def test_etag_matches(header, etag, expected):
    assert serve.etag_matches(header, etag) is expected


# --- clients -----------------------------------------------------------------------------


def test_fetch_stats_with_a_cache_revalidates_and_sees_changes(seeded):
    cache = stats.StatsCache()
    with server_thread(seeded) as base:
        first = stats.fetch_stats(base, cache=cache)
        assert cache.revalidated == 0
        again = stats.fetch_stats(base, cache=cache)
        assert cache.revalidated == 1
        assert again is first  # the copy, after a 304
        write(seeded, "UPDATE users SET quota_gpu_minutes = 4242 WHERE username = 'dave'")
        changed = stats.fetch_stats(base, cache=cache)
        assert cache.revalidated == 1
        dave = next(r for r in changed["users"] if r["username"] == "dave")
        assert dave["quota_gpu_minutes"] == 4242
        # Per-user answers are never kept.
        alice = stats.fetch_stats(base, username="alice", cache=cache)
        alice_again = stats.fetch_stats(base, username="alice", cache=cache)
        assert cache.revalidated == 1
        assert alice == alice_again and alice is not alice_again


def test_the_dashboard_revalidates_its_copy(seeded, monkeypatch):
    monkeypatch.setattr(dashboard, "_cache", None)
    with server_thread(seeded) as base:
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "SLURM_QUOTA_URL": base}

        def page() -> str:
            got = []
            body = b"".join(dashboard.application(dict(environ), lambda s, h: got.append(s)))
            assert got == ["200 OK"]
            return body.decode()

        first = page()
        assert "alice" in first and "zed" not in first
        assert dashboard._cache.revalidated == 0
        assert "alice" in page()
        assert dashboard._cache.revalidated == 1
        write(seeded, "INSERT INTO users (username) VALUES ('zed')")
        assert "zed" in page()
        assert dashboard._cache.revalidated == 1  # changed: the whole answer, not the copy
