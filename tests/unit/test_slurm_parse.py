"""slurm_quota.slurm: parsing real Slurm 22.05 outputs, row selection, timeouts, failures."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slurm_quota import slurm as S
from slurm_quota.errors import SlurmUnavailable
from slurm_quota.slurm import RunResult
from tests.unit.slurm_fixtures import FIXTURES, FakeSlurm, case, load, result

SHARED_SACCT = FIXTURES / "shared-observed" / "sacct.psv"


# --------------------------------------------------------------------------- tokens


def test_find_token_takes_the_tagged_uuid_among_other_text():
    comment = "lab note slurm-quota:1e5f9f78-0b05-6c74-eabc-8bdfa1cc3ac3"
    assert S.find_token(comment) == "1e5f9f78-0b05-6c74-eabc-8bdfa1cc3ac3"


def test_find_token_accepts_a_bare_uuid_only_when_it_is_the_whole_comment():
    bare = "265cb163-b761-109d-4183-a9ae2216be28"
    assert S.find_token(bare) == bare
    assert S.find_token(f"  {bare} ") == bare
    assert S.find_token(f"see {bare}") is None
    assert S.find_token("probe:submit#1:uid=1001:t=1795264161") is None
    assert S.find_token("") is None
    assert S.find_token(None) is None


def test_find_token_takes_the_last_tag_when_several():
    a = "11111111-1111-1111-1111-111111111111"
    b = "22222222-2222-2222-2222-222222222222"
    assert S.find_token(f"slurm-quota:{a} admin text slurm-quota:{b}") == b


@given(st.uuids(), st.text(alphabet=st.characters(blacklist_characters="-"), max_size=30))
def test_find_token_finds_any_tagged_uuid_after_any_text(uuid, prefix):
    assert S.find_token(f"{prefix} slurm-quota:{uuid}") == str(uuid)


# --------------------------------------------------------------------------- TRES


@pytest.mark.parametrize(
    ("tres", "expected"),
    [
        # real AllocTRES strings (sacct.psv of the shared capture and our lab captures)
        ("billing=1,cpu=1,gres/gpu:h100=2,gres/gpu=2,node=1", {"h100": 2}),
        ("billing=1,cpu=1,gres/gpu:a100=1,gres/gpu:h100=1,gres/gpu=2,node=1",
         {"a100": 1, "h100": 1}),
        ("billing=16,cpu=16,gres/gpu:a100=2,gres/gpu:h100=2,gres/gpu=4,node=1",
         {"a100": 2, "h100": 2}),
        ("cpu=16,node=1,billing=16,gres/gpu=4,gres/gpu:a100=2,gres/gpu:h100=2",
         {"a100": 2, "h100": 2}),
        ("billing=1,cpu=1,node=1", {}),
        ("", {}),
        # synthetic: an untyped-only allocation (a site without GPU types)
        ("billing=1,cpu=1,gres/gpu=2,node=1", {"default": 2}),
    ],
)  # fmt: skip
def test_gpus_by_type_typed_entries_win_and_untyped_is_never_added(tres, expected):
    assert S.gpus_by_type(tres) == expected


# --------------------------------------------------------------------------- scontrol


def test_scontrol_record_of_a_finished_gpu_job():
    job = S.parse_scontrol_jobs(case("gpus2_split")["scontrol"].stdout)[0]
    assert job.job_id == 17
    assert job.username == "alice"
    assert job.account == "research"
    assert job.job_state == "COMPLETED"
    assert (job.start_time, job.end_time) == (1795265568, 1795265570)
    assert job.num_cpus == 1
    assert job.gpus_by_type == {"a100": 1, "h100": 1}
    assert job.token == "ddbf5dea-8ae5-83f1-a206-6782594a04d6"


def test_scontrol_bare_uuid_admin_comment():
    job = S.parse_scontrol_jobs(case("bare_uuid")["scontrol"].stdout)[0]
    assert job.admin_comment == "265cb163-b761-109d-4183-a9ae2216be28"
    assert job.token == "265cb163-b761-109d-4183-a9ae2216be28"


def test_controller_job_picks_its_own_record_from_an_array_master_listing():
    # `scontrol show job 18` (the array master id = raw id of task 2) lists all 3 tasks.
    c = case("array_task2")
    jobs = S.parse_scontrol_jobs(c["scontrol"].stdout)
    assert sorted(j.job_id for j in jobs) == [18, 19, 20]
    fake = FakeSlurm(scontrol=c["scontrol"])
    job = S.controller_job(18, runner=fake)
    assert job is not None
    assert (job.job_id, job.array_job_id, job.array_task_id) == (18, 18, 2)
    assert fake.calls[0][0] == ["scontrol", "show", "job", "-o", "18"]


def test_controller_job_picks_the_het_leader_not_its_component():
    c = case("het_cancelled_leader")
    assert len(S.parse_scontrol_jobs(c["scontrol"].stdout)) == 2
    job = S.controller_job(23, runner=FakeSlurm(scontrol=c["scontrol"]))
    assert job is not None
    assert (job.job_id, job.het_job_id, job.het_job_offset) == (23, 23, 0)
    assert job.token == "612db328-9b33-7ed2-5f20-c841066327fe"


def test_controller_job_returns_none_for_a_purged_job():
    invalid = result(load("scontrol_invalid_id")["scontrol"])
    assert invalid.returncode != 0
    assert S.controller_job(999999, runner=FakeSlurm(scontrol=invalid)) is None


def test_controller_job_raises_when_the_controller_fails():
    down = RunResult(1, "", "slurm_load_jobs error: Unable to contact slurm controller\n")
    with pytest.raises(SlurmUnavailable, match="Unable to contact"):
        S.controller_job(5, runner=FakeSlurm(scontrol=down))


# --------------------------------------------------------------------------- sacct


def test_sacct_job_keeps_only_the_raw_id_rows_of_an_array_master():
    c = case("array_task2")
    rows = S.parse_sacct(c["sacct"].stdout)
    assert sorted(r.job_id for r in rows) == [18, 19, 20]
    mine = S.sacct_job(18, runner=FakeSlurm(sacct=c["sacct"]))
    assert [(r.job_id, r.job_id_text, r.array_job_id, r.array_task_id) for r in mine] == [
        (18, "18_2", 18, 2)
    ]


def test_sacct_row_fields_and_epoch_times():
    row = S.parse_sacct(case("exclusive")["sacct"].stdout)[0]
    assert (row.job_id, row.username, row.account, row.state) == (11, "alice", "research",
                                                                  "COMPLETED")  # fmt: skip
    assert (row.alloc_cpus, row.elapsed_s) == (16, 2)
    assert (row.start_time, row.end_time) == (1795265553, 1795265555)
    assert row.gpus_by_type == {"a100": 2, "h100": 2}
    assert row.final


def test_stale_sacct_row_right_after_the_end_is_not_final():
    # captured at the exact moment jobcomp ran: PENDING, End=Unknown, no AllocTRES
    row = S.parse_sacct(case("exclusive")["sacct_first"].stdout)[0]
    assert row.state == "PENDING"
    assert row.end_time is None
    assert not row.final


def test_sacct_requeued_run_and_cancelled_states():
    rq = S.parse_sacct(case("requeue_run1")["sacct"].stdout)
    assert [r.state for r in rq][0] == "REQUEUED"
    assert rq[0].final
    meta = S.parse_sacct(case("array_meta_cancelled")["sacct"].stdout)[0]
    assert meta.job_id_text == "22_[0-3]"
    assert meta.state == "CANCELLED by 0"
    assert S.base_state(meta.state) == "CANCELLED"
    assert meta.start_time is None and meta.end_time == 1795265597
    assert meta.final


def test_sacct_admin_comment_with_the_delimiter_stays_whole():
    # synthetic line in the real field order: a '|' inside the admin comment (the last field)
    line = "5|5|alice|research|main|COMPLETED|1|2|1|3|cpu=1|a|b slurm-quota:" + "1" * 8 + \
        "-1111-1111-1111-" + "1" * 12
    row = S.parse_sacct(line)[0]
    assert row.admin_comment.startswith("a|b ")
    assert row.token == "11111111-1111-1111-1111-111111111111"


def test_shared_probe_capture_parses_het_and_array_ids():
    # The 2-field subset of the shared capture (other field order): check id-text parsing.
    text = SHARED_SACCT.read_text()
    ids = [line.split("|")[0] for line in text.splitlines()[1:]]
    assert "9+1" in ids and "7_9" in ids


def test_sacct_window_is_one_batched_query_over_final_states():
    fake = FakeSlurm(sacct=result(load("sacct_window")["sacct"]))
    rows = S.sacct_window(1795260000, 1795270000, runner=fake)
    assert fake.count("sacct") == 1
    argv = fake.calls[0][0]
    assert argv[:6] == ["sacct", "-a", "-X", "-D", "-P", "-n"]
    assert argv[argv.index("-s") + 1] == S.RECONCILE_STATES
    assert len(rows) >= 20
    assert all(r.final for r in rows)


def test_sacct_failure_raises():
    down = RunResult(1, "", "sacct: error: Problem talking to the database: Connection refused\n")
    with pytest.raises(SlurmUnavailable, match="Connection refused"):
        S.sacct_job(5, runner=FakeSlurm(sacct=down))


# --------------------------------------------------------------------------- squeue


def test_queue_tokens_from_real_squeue_output():
    d = load("squeue_all")
    snap = S.queue_tokens(runner=FakeSlurm(squeue=result(d["squeue"])))
    assert snap.job_count == len(d["squeue"]["stdout"].strip().splitlines())
    assert snap.job_count >= 2
    assert "265cb163-b761-109d-4183-a9ae2216be28" in snap.tokens  # a bare-uuid job


def test_queue_tokens_empty_queue_is_an_answer():
    snap = S.queue_tokens(runner=FakeSlurm(squeue=RunResult(0, "", "")))
    assert snap == S.QueueSnapshot(frozenset(), 0)


def test_queue_tokens_failure_is_not_an_empty_queue():
    down = RunResult(1, "", "squeue: error: Unable to contact slurm controller\n")
    with pytest.raises(SlurmUnavailable):
        S.queue_tokens(runner=FakeSlurm(squeue=down))
    garbage = RunResult(0, "slurm_load_jobs error: something\n", "")
    with pytest.raises(SlurmUnavailable):
        S.queue_tokens(runner=FakeSlurm(squeue=garbage))


# --------------------------------------------------------------------------- the real runner


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-slurm"
    path.write_text(f"#!{sys.executable}\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_run_command_kills_a_hung_command_even_with_term_blocked(tmp_path):
    # A client that ignores SIGTERM (as in jobcomp, where TERM is blocked) and hangs.
    exe = _script(
        tmp_path,
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "open(__file__ + '.pid', 'w').write(str(__import__('os').getpid()))\ntime.sleep(600)",
    )
    with pytest.raises(SlurmUnavailable, match="did not answer"):
        S.run_command([exe], 1.0)
    pid = int(Path(exe + ".pid").read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the hung command survived its timeout")


def test_run_command_asks_for_epoch_times(tmp_path):
    exe = _script(tmp_path, "import os\nprint(os.environ.get('SLURM_TIME_FORMAT'))")
    assert S.run_command([exe], 10).stdout.strip() == "%s"


def test_run_command_missing_binary_is_unavailable():
    with pytest.raises(SlurmUnavailable, match="Cannot run"):
        S.run_command(["/nonexistent/sacct"], 1)
