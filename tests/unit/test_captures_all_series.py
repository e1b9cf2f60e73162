"""Every Slurm series' real captures (tests/fixtures/slurm-<series>/charge/, capture.py): the
charge path reads each the way Slurm's own accounting reports the job.

The oracle is the test's own reading of the captured `sacct -P` row (AllocTRES, ElapsedRaw),
not slurm_quota's parser: on 24.11 and 26.05 scontrol prints AllocTRES= where 22.05 printed
TRES=, and a parser reading only the old key charged typed GPU jobs 0 GPU-minutes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from slurm_quota import charge as C
from slurm_quota import slurm as S
from tests.unit.slurm_fixtures import FakeSlurm, result

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SERIES = sorted(p.parent.name.split("-", 1)[1] for p in FIXTURES.glob("slurm-*/charge"))


def _job_captures() -> list[tuple[str, str]]:
    out = []
    for series in SERIES:
        for path in sorted((FIXTURES / f"slurm-{series}" / "charge").glob("*.json")):
            if "env" in json.loads(path.read_text()):
                out.append((series, path.stem))
    return out


CASES = _job_captures()


def test_every_lab_release_has_its_captures():
    assert SERIES == ["22.05", "24.11", "26.05"]
    names = {s: {n for ss, n in CASES if ss == s} for s in SERIES}
    for series in SERIES[1:]:
        assert names[series] >= {"plain", "gres_h100", "gpus2_split", "exclusive", "timeout"}


def load(series: str, name: str) -> dict:
    return json.loads((FIXTURES / f"slurm-{series}" / "charge" / f"{name}.json").read_text())


def sacct_row(capture: dict) -> dict[str, str]:
    """The job's own row of the final sacct capture, keyed by field name."""
    for line in capture["sacct"]["stdout"].splitlines():
        row = dict(zip(S.SACCT_FIELDS, line.split("|")))
        if row.get("JobIDRaw") == str(capture["job_id"]):
            return row
    raise AssertionError(f"no sacct row for job {capture['job_id']}")


def typed_gpus(alloc_tres: str) -> dict[str, int]:
    """gres/gpu:<type>=N entries of a TRES string (the untyped total gres/gpu=N excluded)."""
    return {t: int(n) for t, n in re.findall(r"gres/gpu:([^=,]+)=(\d+)", alloc_tres)}


def cpus(alloc_tres: str) -> int:
    m = re.search(r"(?:^|,)cpu=(\d+)", alloc_tres)
    return int(m.group(1)) if m else 0


def charge(conn, capture: dict, scontrol=None) -> C.ChargeResult:
    runner = FakeSlurm(
        scontrol=scontrol or result(capture["scontrol"]), sacct=result(capture["sacct"])
    )
    return C.charge_env(conn, dict(capture["env"]), runner=runner, sleep=lambda s: None)


@pytest.mark.parametrize("series, name", CASES, ids=[f"{s}-{n}" for s, n in CASES])
def test_charge_reads_the_allocation_sacct_reports(conn, series, name):
    capture = load(series, name)
    row = sacct_row(capture)
    res = charge(conn, capture)
    if not res.charged:
        pytest.fail(f"not charged: {res}")
    run = res.charge.run
    if row["State"].split()[0] in ("COMPLETED", "FAILED", "TIMEOUT") and row["AllocTRES"]:
        assert run.cpus == cpus(row["AllocTRES"]), row["AllocTRES"]
        assert dict(res.charge.gpus_by_type) == typed_gpus(row["AllocTRES"]), row["AllocTRES"]
        env = capture["env"]
        assert run.elapsed_s == int(env["END"]) - int(env["START"])


@pytest.mark.parametrize(
    "series, name",
    [c for c in CASES if c[1] in ("gres_h100", "gpus_a100", "gpus2_split", "exclusive")],
    ids=lambda v: v,
)
def test_typed_gpu_jobs_are_charged_their_gpus_on_every_series(conn, series, name):
    capture = load(series, name)
    expected = typed_gpus(sacct_row(capture)["AllocTRES"])
    assert expected, "the capture allocated GPUs"
    res = charge(conn, capture)
    assert dict(res.charge.gpus_by_type) == expected


@pytest.mark.parametrize("series, name", CASES, ids=[f"{s}-{n}" for s, n in CASES])
def test_controller_and_accounting_paths_agree(tmp_path, series, name):
    """The same run charged from scontrol's record and, with slurmctld's record gone, from
    sacct's row gives the same allocation."""
    from slurm_quota import db

    capture = load(series, name)
    gone = FIXTURES / f"slurm-{series}" / "charge" / "scontrol_invalid_id.json"
    invalid = result(json.loads(gone.read_text())["scontrol"])
    outcomes = []
    for i, scontrol in enumerate((None, invalid)):
        path = tmp_path / f"{i}.db"
        db.migrate(path)
        conn = db.connect(path)
        try:
            res = charge(conn, capture, scontrol=scontrol)
        finally:
            conn.close()
        c = res.charge
        outcomes.append(
            (c.run.cpus, c.run.elapsed_s, dict(c.gpus_by_type), c.cpu_minutes, c.gpu_minutes)
        )
    assert outcomes[0] == outcomes[1]
