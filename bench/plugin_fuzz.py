"""Benchmark the plugin's worst decision time over hostile --array specifications (issue 19).

lua/job_submit.lua under the real lua5.1 + LuaDBI + SQLite (tests/lua/driver.lua, monotonic
clock around each slurm_job_submit call), on a migrated ledger where alice has a finite
quota (so every check runs). The corpus: every shape below at every size from 1 KB to 8 MB
(under, at and over the 65,536-character bound), plus random small specifications like the
fuzz test's; each case is submitted --rounds times. Reports the worst and median time per
case and the worst over the corpus, against the 250 ms budget of a decision.

    .venv/bin/python bench/plugin_fuzz.py [--rounds 3] [--before REV] [--json]

--before REV also runs the plugin as it was at git revision REV (e.g. the commit before the
bound) on the same corpus.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from slurm_quota import db  # noqa: E402
from tests.lua.harness import MAIN_PARTITION, submit_case  # noqa: E402
from tests.lua.realrun import require_real_lua, run_cases  # noqa: E402

BUDGET_MS = 250.0
BOUND = 65536
SIZES = [1_000, 16_000, BOUND - 1, BOUND, BOUND + 1, 128 * 1024, 1_300_000, 3_600_000,
         8_000_000]


def _fill(piece_fn, size: int) -> str:
    parts, n, i = [], 0, 0
    while n < size:
        p = piece_fn(i)
        parts.append(p)
        n += len(p)
        i += 1
    return "".join(parts)[:size].rstrip(",") or "0"


SHAPES = {
    # distinct single indices: the most ranges to sort and merge
    "singletons": lambda i: f"{(i * 7919) % 4_000_001},",
    "step1 ranges": lambda i: f"{(i * 37) % 3_999_000}-{(i * 37) % 3_999_000 + 5},",
    "stepped ranges": lambda i: f"{i % 1000}-{i % 1000 + 40}:{1 + i % 7},",
    "duplicates": lambda i: "0,",
    "garbage": lambda i: "x",
    "one number": lambda i: "9",
    "throttle": lambda i: "0-9%" if i == 0 else "7",
}


def corpus(seed: int = 19) -> list[tuple[str, str]]:
    """(label, spec) of every case."""
    out = [(f"{shape} {size}", _fill(fn, size)) for shape, fn in SHAPES.items()
           for size in SIZES]
    rnd = random.Random(seed)
    alphabet = "0123456789-:%,[] x"
    for k in range(100):
        spec = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 40)))
        out.append((f"random {k}", spec))
    return out


def ledger(path: Path) -> Path:
    """A migrated ledger with alice's and research's finite quotas."""
    db.migrate(path)
    conn = db.connect(path)
    conn.execute("INSERT INTO users (username, quota_cpu_minutes, quota_gpu_minutes) "
                 "VALUES ('alice', 10000000000, 1000000)")
    conn.execute("INSERT INTO accounts (account, quota_cpu_minutes, quota_gpu_minutes) "
                 "VALUES ('research', 10000000000, 1000000)")
    conn.close()
    return path


def plugin_at(rev: str, directory: Path) -> Path:
    """lua/job_submit.lua and lua/slurm_quota.lua as they were at git revision rev."""
    for name in ("job_submit.lua", "slurm_quota.lua"):
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:lua/{name}"],
                              capture_output=True, text=True, check=True).stdout
        (directory / name).write_text(text)
    return directory / "job_submit.lua"


def measure(plugin: Path, cases: list[tuple[str, str]], rounds: int) -> dict[str, object]:
    """Submit every case `rounds` times in one lua5.1 process; times per case in ms."""
    with tempfile.TemporaryDirectory(prefix="sq-fuzz-bench-") as tmp:
        tmp_path = Path(tmp)
        db_path = ledger(tmp_path / "ledger.db")
        warm = [{"kind": "submit", "desc": submit_case("c01_plain", time_limit=1.0),
                 "parts": [MAIN_PARTITION]}]
        calls = [{"kind": "submit",
                  "desc": submit_case("c01_plain", time_limit=1.0, array_inx=spec),
                  "parts": [MAIN_PARTITION]}
                 for _ in range(rounds) for _, spec in cases]
        run = run_cases(warm + calls, tmp_path, db_path, plugin=plugin, timeout=3600)
    results = run.calls[1:]
    per_case: dict[str, list[float]] = {}
    outcome: dict[str, str] = {}
    for i, call in enumerate(results):
        label = cases[i % len(cases)][0]
        per_case.setdefault(label, []).append(call.ms)
        errors = call.log_text("error")
        if "ACCEPTED WITHOUT" in errors or "REFUSED (fail-closed)" in errors:
            outcome[label] = "policy: " + errors[:80]
        else:
            outcome[label] = {0: "accepted", -1: "refused", 2050: "over quota"}.get(
                call.rc, str(call.rc))
    rows = [{"case": label, "worst_ms": max(ms), "median_ms": statistics.median(ms),
             "outcome": outcome[label]} for label, ms in per_case.items()]
    worst = max(rows, key=lambda r: r["worst_ms"])
    return {"rows": rows, "worst_ms": worst["worst_ms"], "worst_case": worst["case"],
            "calls": len(results)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", metavar="REV", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    require_real_lua()
    cases = corpus()
    report = {"machine": f"{platform.node()} {platform.machine()}, "
                         f"{platform.python_version()}",
              "cases": len(cases), "rounds": args.rounds,
              "now": measure(REPO / "lua" / "job_submit.lua", cases, args.rounds)}
    if args.before:
        with tempfile.TemporaryDirectory(prefix="sq-fuzz-before-") as tmp:
            report["before"] = measure(plugin_at(args.before, Path(tmp)), cases, args.rounds)
            report["before"]["rev"] = args.before
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key in ("now", "before"):
        if key not in report:
            continue
        r = report[key]
        print(f"== {key}{' (' + r['rev'] + ')' if key == 'before' else ''}: "
              f"{r['calls']} decisions, worst {r['worst_ms']:.1f} ms ({r['worst_case']}), "
              f"budget {BUDGET_MS:.0f} ms: {'OK' if r['worst_ms'] < BUDGET_MS else 'OVER'}")
        print(f"{'case':<28} {'worst ms':>9} {'median ms':>10}  outcome")
        for row in sorted(r["rows"], key=lambda x: -x["worst_ms"])[:25]:
            print(f"{row['case']:<28} {row['worst_ms']:>9.1f} {row['median_ms']:>10.1f}  "
                  f"{row['outcome']}")
    return 0 if report["now"]["worst_ms"] < BUDGET_MS else 1


if __name__ == "__main__":
    raise SystemExit(main())
