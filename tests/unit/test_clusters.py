"""Several clusters on one ledger (setting cluster_keys): each cluster has its own job ids, so
a run's charge key names its cluster; runs charged before the sharing stay charged once; the
orphan sweep and prune judge only the preallocations their own cluster's plugin made (column
`cluster`, migration 0007). On both engines."""

from __future__ import annotations

from pathlib import Path

import pytest

from slurm_quota import charge as C
from slurm_quota import db, validate
from slurm_quota import reconcile as R
from slurm_quota.errors import InvalidInput, SlurmUnavailable
from slurm_quota.slurm import RunResult
from tests.unit.slurm_fixtures import FakeSlurm, case, load, result, runner_for
from tests.unit.test_charge import add_prealloc, charges, consumed, prealloc_size, token_of

SHOW_CONFIG = (
    Path(__file__).resolve().parents[1] / "fixtures" / "slurm-22.05" / "scontrol_show_config.txt"
)


@pytest.fixture
def conn(any_conn):
    """On both engines: SQLite and MariaDB (tests/conftest.py)."""
    return any_conn


def share(conn) -> None:
    with db.write_transaction(conn):
        db.set_setting(conn, *validate.parse_setting("cluster_keys", "yes"))


def charge_on(conn, cluster: str | None, name: str = "exclusive") -> C.ChargeResult:
    env = dict(case(name)["env"])
    env.pop("CLUSTER", None)
    if cluster is not None:
        env["CLUSTER"] = cluster
    return C.charge_env(conn, env, runner=runner_for(name), sleep=lambda _s: None)


def test_the_captured_jobcomp_environment_names_its_cluster():
    assert case("exclusive")["env"]["CLUSTER"] == "lab"


def test_without_cluster_keys_a_second_cluster_s_run_collides(conn):
    # the problem: same job id, same start second on two clusters = one key
    assert charge_on(conn, "lab").charged
    assert not charge_on(conn, "other").charged
    assert len(charges(conn)) == 1


def test_with_cluster_keys_each_cluster_s_run_is_charged_once(conn):
    share(conn)
    set_h100 = "INSERT INTO gpu_factors (gpu_type, factor) VALUES ('h100', 100.0)"
    conn.execute(set_h100)
    assert charge_on(conn, "lab").charged
    assert charge_on(conn, "other").charged
    assert not charge_on(conn, "lab").charged  # a replay on either cluster changes nothing
    assert not charge_on(conn, "other").charged
    keys = sorted(str(r["charge_key"]) for r in charges(conn))
    plain = C.run_from_env(case("exclusive")["env"]).charge_key
    assert keys == [f"{plain}@lab", f"{plain}@other"]
    assert consumed(conn, "user", "alice") == (2, 14)  # two runs of 1 CPU-min / 7 GPU-min


def test_a_run_charged_before_the_sharing_is_not_charged_again(conn):
    assert charge_on(conn, "lab").charged  # key without a cluster
    share(conn)
    assert not charge_on(conn, "lab").charged
    assert len(charges(conn)) == 1


def test_a_run_without_its_cluster_is_refused_when_clusters_share(conn):
    share(conn)
    with pytest.raises(InvalidInput, match="cluster is not known"):
        charge_on(conn, None)
    assert charges(conn) == []


def _reconcile_slurm(config: RunResult | Exception) -> FakeSlurm:
    window = result(load("array_master_listing")["sacct"])

    def scontrol(argv):
        if argv[1:3] == ["show", "config"]:
            if isinstance(config, Exception):
                raise config
            return config
        return result(load("scontrol_invalid_id")["scontrol"])

    return FakeSlurm(sacct=window, squeue=result(load("squeue_all")["squeue"]), scontrol=scontrol)


def test_reconcile_names_the_cluster_from_slurm_and_sweeps_only_its_own_orphans(conn):
    share(conn)
    mine = "0badc0de-0000-4000-8000-000000000001"
    theirs = "0badc0de-0000-4000-8000-000000000002"
    unknown = "0badc0de-0000-4000-8000-000000000003"
    add_prealloc(conn, mine, created_at="2026-11-21 10:00:00", cluster="lab")
    add_prealloc(conn, theirs, created_at="2026-11-21 10:00:00", cluster="other")
    add_prealloc(conn, unknown, created_at="2026-11-21 10:00:00")  # before 0007
    config = RunResult(0, SHOW_CONFIG.read_text(), "")
    report = R.reconcile(conn, since=1795260000, now=1795270000, runner=_reconcile_slurm(config))
    assert report.charged > 0
    assert all(key.endswith("@lab") for key in report.charged_keys)
    assert report.sweep_error is None and report.orphans == (mine,)
    assert report.sweep_note and "only cluster lab's" in report.sweep_note
    assert "2 of other clusters" in report.sweep_note
    assert prealloc_size(conn, mine) is None
    assert prealloc_size(conn, theirs) == 1  # another cluster's job may hold it
    assert prealloc_size(conn, unknown) == 1  # nobody can tell whose it is
    again = R.reconcile(conn, since=1795260000, now=1795270000, runner=_reconcile_slurm(config))
    assert again.charged == 0 and again.already_charged == report.charged
    assert again.orphans == ()


def test_reconcile_charges_nothing_when_the_cluster_name_cannot_be_read(conn):
    share(conn)
    down = SlurmUnavailable("scontrol: error: slurm_load_ctl_conf: Unable to contact")
    with pytest.raises(SlurmUnavailable):
        R.reconcile(conn, since=1795260000, now=1795270000, runner=_reconcile_slurm(down))
    assert charges(conn) == []


def test_reconcile_recognises_runs_the_jobcomp_charged_with_the_cluster(conn):
    share(conn)
    token = token_of("array_task0")
    add_prealloc(conn, token, size=3)
    assert charge_on(conn, "lab", "array_task0").charged
    config = RunResult(0, SHOW_CONFIG.read_text(), "")
    report = R.reconcile(conn, since=1795260000, now=1795270000, runner=_reconcile_slurm(config))
    keys = [str(r["charge_key"]) for r in charges(conn)]
    assert len(keys) == len(set(keys))
    assert report.already_charged >= 1
    assert sum(1 for k in keys if k.startswith(f"{case('array_task0')['env']['JOBID']}:")) == 1


def test_prune_of_orphans_judges_only_this_cluster_s_when_clusters_share(conn):
    share(conn)
    add_prealloc(conn, "0badc0de-0000-4000-8000-000000000011", created_at="2026-11-21 10:00:00",
                 cluster="lab")
    add_prealloc(conn, "0badc0de-0000-4000-8000-000000000012", created_at="2026-11-21 10:00:00",
                 cluster="other")
    config = RunResult(0, SHOW_CONFIG.read_text(), "")
    empty = RunResult(0, "", "")
    slurm = FakeSlurm(sacct=empty, squeue=empty, scontrol=lambda argv: config)
    report = R.prune(conn, preallocs=True, users=False, accounts=False, runner=slurm,
                     now=1795270000)
    assert report.preallocations == ("0badc0de-0000-4000-8000-000000000011",)
    assert prealloc_size(conn, "0badc0de-0000-4000-8000-000000000012") == 1


def test_the_setting_takes_yes_or_no_only():
    assert validate.parse_setting("cluster_keys", "YES") == ("cluster_keys", "yes")
    with pytest.raises(InvalidInput, match="yes or no"):
        validate.parse_setting("cluster_keys", "maybe")
