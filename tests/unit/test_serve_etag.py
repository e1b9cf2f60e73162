"""Entity tags on the whole-ledger answers: `ETag`, `If-None-Match` → 304 while the ledger
gives the same bytes, and the clients that use them (`fetch_stats(cache=...)`, the dashboard).

The application in this process; the 304 on a kept-alive connection and the clients
against the real service process.
"""

from __future__ import annotations

import gzip
import http.client
import json
import re
from urllib.parse import urlsplit

import pytest

from slurm_quota import client, db, readmodel
from slurm_quota.app import Settings, create_app
from tests.web.readside import (
    EXPECTED_USERS,
    local_app,
    numbers,
    seed_ledger,
    server_thread,
    wsgi_request,
)

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
    assert len(wsgi_request(local_app(db_path), "GET", "/stats")[2]) > readmodel.GZIP_MIN_BYTES
    return db_path


@pytest.fixture
def url(seeded):
    """The application over the seeded ledger (named url: these tests once ran over HTTP)."""
    return local_app(seeded)


def request(app, path: str, *headers: tuple[str, str], method: str = "GET"):
    """(status, headers as a dict, body) of one request to app."""
    return wsgi_request(app, method, path, dict(headers))


def http_request(base: str, path: str, *headers: tuple[str, str],
                 conn: http.client.HTTPConnection):
    """(status, headers as a dict, body) of one request on the open connection conn."""
    conn.request("GET", path, headers=dict(headers))
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


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


def test_the_tag_back_gets_304_without_a_body_and_the_connection_goes_on(seeded):
    with server_thread(seeded) as url:
        host = urlsplit(url)
        conn = http.client.HTTPConnection(host.hostname, host.port, timeout=10)
        _status, headers, _body = http_request(url, "/stats", conn=conn)
        status, again, body = http_request(url, "/stats", ("If-None-Match", headers["etag"]),
                                           conn=conn)
        assert (status, body) == (304, b"")
        assert again["etag"] == headers["etag"]
        assert "content-length" not in again and "content-type" not in again
        # The same connection: a 304 has no body, so the next answer is framed right.
        status, _h, body = http_request(url, "/stats?username=alice", conn=conn)
        assert status == 200
        assert numbers(json.loads(body)["users"][0]) == EXPECTED_USERS["alice"]
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
    status, headers, _body = request(local_app(missing), "/stats", ("If-None-Match", "*"))
    assert status == 503
    assert "etag" not in headers


def test_the_tag_is_the_same_after_a_restart(seeded):
    tags = [request(local_app(seeded), "/stats")[1]["etag"] for _ in range(2)]
    assert TAG.fullmatch(tags[0])
    assert tags[0] == tags[1]


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
    assert readmodel.etag_matches(header, etag) is expected


# --- clients -----------------------------------------------------------------------------


def test_fetch_stats_with_a_cache_revalidates_and_sees_changes(seeded):
    cache = client.StatsCache()
    with server_thread(seeded) as base:
        first = client.fetch_stats(base, cache=cache)
        assert cache.revalidated == 0
        again = client.fetch_stats(base, cache=cache)
        assert cache.revalidated == 1
        assert again is first  # the copy, after a 304
        write(seeded, "UPDATE users SET quota_gpu_minutes = 4242 WHERE username = 'dave'")
        changed = client.fetch_stats(base, cache=cache)
        assert cache.revalidated == 1
        dave = next(r for r in changed["users"] if r["username"] == "dave")
        assert dave["quota_gpu_minutes"] == 4242
        # Per-user answers are never kept.
        alice = client.fetch_stats(base, username="alice", cache=cache)
        alice_again = client.fetch_stats(base, username="alice", cache=cache)
        assert cache.revalidated == 1
        assert alice == alice_again and alice is not alice_again


def test_the_dashboard_revalidates_its_copy(seeded, monkeypatch):
    caches = []

    class Counted(client.StatsCache):
        def __init__(self):
            super().__init__()
            caches.append(self)

    monkeypatch.setattr(client, "StatsCache", Counted)
    with server_thread(seeded) as base:
        dashboard = create_app(Settings(api_url=base))

        def page() -> str:
            status, _headers, body = wsgi_request(dashboard, "GET", "/")
            assert status == 200
            return body.decode()

        first = page()
        assert "alice" in first and "zed" not in first
        assert [c.revalidated for c in caches] == [0]
        assert "alice" in page()
        assert [c.revalidated for c in caches] == [1]
        write(seeded, "INSERT INTO users (username) VALUES ('zed')")
        assert "zed" in page()
        assert [c.revalidated for c in caches] == [1]  # changed: the whole answer, not the copy
