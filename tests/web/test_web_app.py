"""The dashboard of the one WSGI application as mod_wsgi and `slurm-quota-web` run it (data
from the service at SLURM_QUOTA_URL), against a live `slurm-quota serve` on a seeded ledger."""

from __future__ import annotations

import io
import os
import runpy
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from slurm_quota import app, db, web
from tests.web.dom import table_rows
from tests.web.readside import SLURM_QUOTA_WEB_BIN, seed_ledger, server_thread


@pytest.fixture
def api(db_path):
    seed_ledger(db_path)
    with server_thread(db_path) as url:
        yield url


def call(api_url: str | None, path: str = "/", query: str = "", method: str = "GET",
         script_name: str = "") -> tuple[str, dict, str]:
    environ = {
        "REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
        "SCRIPT_NAME": script_name, "wsgi.input": io.BytesIO(),
    }
    if api_url is not None:
        environ["SLURM_QUOTA_URL"] = api_url  # as Apache SetEnv passes it
    seen = {}

    def start_response(status, headers):
        seen["status"], seen["headers"] = status, dict(headers)

    body = b"".join(app.application(environ, start_response))
    return seen["status"], seen["headers"], body.decode()


def test_page_shows_users_and_accounts_with_their_numbers(api):
    status, headers, page = call(api)
    assert status == "200 OK"
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    rows = table_rows(page).sections
    assert list(rows["users"]) == ["alice", "bob", "carol", "dave"]
    assert list(rows["accounts"]) == ["bio", "hpc", "phys"]
    alice = rows["users"]["alice"]
    assert alice["cpu-consumed"] == "1,200"
    assert alice["cpu-prealloc"] == "250(3)"
    assert alice["cpu-quota"] == "5,000"
    assert alice["cpu-usage"] == "29.0%"
    assert alice["gpu-usage"] == "50.0%"
    assert rows["users"]["carol"]["cpu-quota"] == "∞"
    assert rows["users"]["carol"]["cpu-usage"] == "unlimited"
    assert rows["accounts"]["hpc"]["cpu-prealloc"] == "507(4)"


def test_usage_bar_colour_classes_follow_80_and_95_percent(api):
    classes = table_rows(call(api)[2]).classes["users"]
    assert "ok" in classes["alice"] and "warn" not in classes["alice"]
    assert "warn" in classes["bob"]  # 93.07 %
    assert "crit" in classes["dave"]  # zero quota
    assert web.usage_class(80.0) == "ok"
    assert web.usage_class(80.01) == "warn"
    assert web.usage_class(95.0) == "warn"
    assert web.usage_class(95.01) == "crit"
    assert web.usage_class(None) == ""


def test_hours_toggle_divides_by_60(api):
    rows = table_rows(call(api, query="unit=hours")[2]).sections
    assert rows["users"]["alice"]["cpu-consumed"] == "20.00"
    assert rows["users"]["alice"]["cpu-prealloc"] == "4.17(3)"
    assert rows["accounts"]["hpc"]["cpu-quota"] == "1,666.67"


def test_user_filter_is_a_substring_and_an_exact_name_shows_their_accounts(api):
    rows = table_rows(call(api, query="user=E")[2]).sections  # alice, dave
    assert list(rows["users"]) == ["alice", "dave"]
    assert list(rows["accounts"]) == ["bio", "hpc", "phys"]
    status, _, page = call(api, query="user=alice")
    rows = table_rows(page).sections
    assert list(rows["users"]) == ["alice"]
    assert list(rows["accounts"]) == ["hpc", "phys"]
    assert "Accounts of alice" in page


def test_account_filter(api):
    rows = table_rows(call(api, query="account=h")[2]).sections
    assert list(rows["accounts"]) == ["hpc", "phys"]
    assert list(rows["users"]) == ["alice", "bob", "carol", "dave"]


def test_no_match_says_so(api):
    page = call(api, query="user=zzz")[2]
    assert "No user matches “zzz”." in page


def test_sort_by_usage_puts_the_fullest_first(api):
    rows = table_rows(call(api, query="sort=usage")[2]).sections
    assert list(rows["users"]) == ["dave", "bob", "alice", "carol"]


def test_auto_refresh_meta_and_switching_it_off(api):
    assert '<meta http-equiv="refresh" content="60">' in call(api)[2]
    assert '<meta http-equiv="refresh" content="15">' in call(api, query="refresh=15")[2]
    assert 'http-equiv="refresh"' not in call(api, query="refresh=0")[2]
    # what is not a whole number of seconds in ASCII digits keeps the default period
    for bad in ("-5", "1e3", "%D9%A3", "99999999999999999999999999999999999", "x"):
        assert '<meta http-equiv="refresh" content="60">' in call(api, query=f"refresh={bad}")[2]
    assert '<meta http-equiv="refresh" content="86400">' in call(api, query="refresh=999999")[2]


@pytest.mark.parametrize("port", ["٣", "65536", "-1", "80x", ""])
def test_slurm_quota_web_refuses_a_port_that_is_not_one(port, monkeypatch, capsys):
    from slurm_quota.serve import web_main

    monkeypatch.setenv("SLURM_QUOTA_WEB_PORT", port)
    assert web_main([]) == 2
    assert "SLURM_QUOTA_WEB_PORT" in capsys.readouterr().err
    monkeypatch.delenv("SLURM_QUOTA_WEB_PORT")
    assert web_main(["--port", port]) == 2
    assert "is not a port number (0-65535)" in capsys.readouterr().err


def test_names_are_html_escaped(db_path):
    conn = db.connect(db_path)
    conn.execute("INSERT INTO users (username) VALUES ('<script>x</script>')")
    conn.close()
    with server_thread(db_path) as url:
        page = call(url)[2]
    assert "<script>x</script>" not in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page


def test_service_down_gives_503_page_with_the_reason():
    status, _, page = call("http://127.0.0.1:9/")
    assert status == "503 Service Unavailable"
    assert 'class="error"' in page
    assert "http://127.0.0.1:9/stats" in page


def test_static_files_are_packaged_and_served(api):
    status, headers, css = call(api, "/static/style.css")
    assert status == "200 OK"
    assert headers["Content-Type"] == "text/css; charset=utf-8"
    assert ".bar" in css
    assert call(api, "/static/dashboard.js")[1]["Content-Type"].startswith("text/javascript")
    for bad in ("/static/../__init__.py", "/static/nope.css", "/static/x/../style.css"):
        assert call(api, bad)[0] == "404 Not Found"
    assert call(api, "/elsewhere")[0] == "404 Not Found"


def test_only_get_and_head(api):
    status, headers, _ = call(api, method="POST")
    assert status == "405 Method Not Allowed"
    assert headers["Allow"] == "GET, HEAD"
    status, headers, body = call(api, method="HEAD")
    assert status == "200 OK" and body == "" and int(headers["Content-Length"]) > 0


def test_mounted_under_a_prefix_links_keep_the_prefix(api):
    page = call(api, query="user=bob", script_name="/quota")[2]
    assert 'href="/quota/static/style.css"' in page
    assert 'action="/quota/"' in page
    assert 'href="/quota/?user=bob&amp;unit=hours"' in page


def test_standalone_server_reads_its_environment(api):
    env = dict(os.environ, SLURM_QUOTA_URL=api, SLURM_QUOTA_WEB_HOST="127.0.0.1",
               SLURM_QUOTA_WEB_PORT="0")
    proc = subprocess.Popen([SLURM_QUOTA_WEB_BIN], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        assert f"statistics from {api}" in line
        port = int(line.split(" on http://127.0.0.1:")[1].split("/")[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/?user=bob", timeout=10) as resp:
            rows = table_rows(resp.read().decode()).sections
        assert rows["users"]["bob"]["cpu-prealloc"] == "307(2)"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert proc.returncode == 0


def test_the_mod_wsgi_script_serves_the_one_application(api):
    # mod_wsgi executes the script file and looks up `application` in what it defines.
    script = Path(web.__file__).with_name("wsgi.py")
    defined = runpy.run_path(str(script))
    assert defined["application"] is app.application
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/stats", "QUERY_STRING": "",
               "SCRIPT_NAME": "", "wsgi.input": io.BytesIO(), "SLURM_QUOTA_URL": api}
    seen = []
    body = b"".join(defined["application"](environ, lambda s, h: seen.append(s)))
    # Away from the ledger the API routes are the service's: not found here, as JSON.
    assert seen == ["404 Not Found"]
    assert b'"not_found"' in body
    assert "bob" in table_rows(call(api)[2]).sections["users"]
