"""Usage over time: /usage, the server-side SVG chart in the dashboard, and the chart in a
real headless Chromium (its screenshot is docs/img/usage-chart.png)."""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from slurm_quota import db, usage
from slurm_quota.web.chart import usage_svg
from tests.web.readside import server_thread
from tests.web.test_dashboard_chromium import _png_size, _run_chromium
from tests.web.usage_seed import CPUS, DAY, day_elapsed_s, seed_usage


@pytest.fixture
def seeded(db_path, monkeypatch):
    return db_path, seed_usage(db_path, monkeypatch)


def test_usage_series_and_cumulative_of_the_period(seeded):
    path, seed = seeded
    conn = db.connect(path, readonly=True)
    try:
        u = usage.usage_payload(conn, account="physics", days=30, now=seed["now"])
    finally:
        conn.close()
    series = u["series"]
    assert len(series) == 31 and all(p["start"] % DAY == 0 for p in series)  # UTC midnights
    yesterday = series[-2]
    day = (yesterday["start"] - seed["start"]) // DAY
    assert yesterday["cpu_minutes"] == CPUS * day_elapsed_s(day) / 60
    assert series[-1]["cpu_minutes"] == 0  # today: nothing ended yet
    # the line ends at the account's consumption now; before the quarter began it is absent
    assert series[-1]["cumulative_cpu_minutes"] == u["row"]["total_consumed_cpu_minutes"]
    begun = [p for p in series if p["cumulative_cpu_minutes"] is not None]
    assert begun[0]["start"] + DAY > u["period_start"]
    assert all(p["cumulative_cpu_minutes"] is None for p in series if p["start"] + DAY
               <= u["period_start"])  # fmt: skip
    (cpu,) = [f for f in u["forecasts"] if f["resource"] == "cpu"]
    assert cpu["reserved_minutes"] == 3000 and cpu["burn_minutes_per_day"] > 0


def test_the_chart_draws_quota_reserved_forecast_and_escapes_names(seeded):
    path, seed = seeded
    conn = db.connect(path, readonly=True)
    try:
        u = usage.usage_payload(conn, account="physics", now=seed["now"])
    finally:
        conn.close()
    svg = usage_svg(u, "cpu")
    assert 'data-quota="90000"' in svg and 'data-reserved="3000"' in svg
    for cls in ("consumed", "quota", "reserved", "forecast", "bucket", "now"):
        assert f'class="{cls}"' in svg, cls
    assert "<script" not in svg
    hostile = {**u, "name": "<b>x</b>"}
    assert "<b>x</b>" not in usage_svg(hostile, "gpu")


def test_usage_route_answers_and_refuses(seeded):
    path, _ = seeded
    with server_thread(path) as url:
        with urllib.request.urlopen(f"{url}usage?account=physics&bucket=week&days=70") as r:
            weekly = json.load(r)
        codes = []
        bad = ("", "username=alice&account=physics", "account=nosuch",
               "account=physics&bucket=hour", "account=physics&days=%D9%A3",
               "account=physics&days=0")  # fmt: skip
        for q in bad:
            try:
                urllib.request.urlopen(f"{url}usage?{q}")
            except urllib.error.HTTPError as err:
                codes.append(err.code)
    assert weekly["bucket"] == "week" and len(weekly["series"]) in (10, 11)
    assert codes == [400, 400, 404, 400, 400, 400]


def test_dashboard_shows_the_chart_for_an_exact_name_only(seeded):
    from tests.web.test_web_app import call

    path, _ = seeded
    with server_thread(path) as url:
        status, _, page = call(url, query="account=physics")
        _, _, partial = call(url, query="account=phys")
        _, _, user_page = call(url, query="user=alice&chart=week&unit=hours")
    assert status.startswith("200")
    assert page.count("<svg") == 2 and 'id="usage"' in page  # CPU and GPU (GPU quota set)
    assert 'id="usage"' not in partial
    assert user_page.count("<svg") == 2  # alice: GPU used, no GPU quota: still drawn
    assert "per week" in user_page and "CPU hours of user alice" in user_page


def test_usage_chart_in_chromium_and_screenshot(seeded, tmp_path):
    from tests.web.test_dashboard_chromium import _dashboard_for

    path, _ = seeded
    shot = tmp_path / "usage-chart.png"
    with _dashboard_for(path) as url:
        dom = _run_chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom",
                            url + "?account=physics")  # fmt: skip
        _run_chromium(tmp_path, "--hide-scrollbars", "--window-size=1100,1300",
                      "--virtual-time-budget=5000", f"--screenshot={shot}",
                      url + "?account=physics&unit=hours")  # fmt: skip
    charts = re.findall(r'<svg[^>]*class="usage-chart (cpu|gpu)"', dom)
    assert charts == ["cpu", "gpu"]
    points = re.search(r'<polyline class="consumed" points="([^"]+)"', dom).group(1).split()
    assert len(points) > 10
    assert _png_size(shot) == (1100, 1300) and shot.stat().st_size > 30_000
    keep = os.environ.get("SLURM_QUOTA_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "usage-chart.png")
