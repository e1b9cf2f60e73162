"""Captured real Slurm 22.05 outputs (tests/fixtures/slurm-22.05/) and a fake runner for them.

Every `case(...)` is a real job run on the lab: its jobcomp environment and the real output
of the scontrol/sacct commands slurm_quota.slurm runs (see the README in that folder).
Anything synthetic is built inside the test that uses it and named so there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Union

from slurm_quota.errors import SlurmUnavailable
from slurm_quota.slurm import RunResult

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "slurm-22.05"
CHARGE = FIXTURES / "charge"


def load(name: str) -> dict:
    """One capture file of fixtures/slurm-22.05/charge/ as a dict."""
    return json.loads((CHARGE / f"{name}.json").read_text())


def result(capture: dict) -> RunResult:
    """A captured command as the RunResult the runner returns."""
    return RunResult(capture["returncode"], capture["stdout"], capture["stderr"])


def case(name: str) -> dict:
    """A captured job: env, scontrol and sacct RunResults, job_id."""
    d = load(name)
    return {
        "env": dict(d["env"]),
        "job_id": d["job_id"],
        "scontrol": result(d["scontrol"]),
        "sacct": result(d["sacct"]),
        "sacct_first": result(d["sacct_first"]),
    }


Response = Union[RunResult, Callable[[Sequence[str]], RunResult], Exception]


class FakeSlurm:
    """A runner that answers from per-command queues of responses and records every call.

    responses: {"scontrol": [r1, r2...], "sacct": [...], "squeue": [...]}; the last response
    of a queue repeats. A response may be a RunResult, an exception to raise, or a callable.
    """

    def __init__(self, **responses: Sequence[Response] | Response) -> None:
        self.responses = {
            k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in responses.items()
        }
        self.calls: list[tuple[list[str], float]] = []

    def __call__(self, argv: Sequence[str], timeout_s: float) -> RunResult:
        self.calls.append((list(argv), timeout_s))
        queue = self.responses.get(argv[0])
        if not queue:
            raise SlurmUnavailable(f"FakeSlurm: no response for {argv[0]}")
        resp = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(resp, Exception):
            raise resp
        if callable(resp):
            return resp(argv)
        return resp

    def count(self, command: str) -> int:
        """How many times command was run."""
        return sum(1 for argv, _ in self.calls if argv[0] == command)


def runner_for(name: str) -> FakeSlurm:
    """A runner answering scontrol and sacct for one captured job."""
    c = case(name)
    return FakeSlurm(scontrol=c["scontrol"], sacct=c["sacct"])
