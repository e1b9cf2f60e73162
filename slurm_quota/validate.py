"""Checks of what a person types: user, account and GPU type names, --reason, job ids,
quotas and plugin settings. Each returns the value to use, or raises InvalidInput with a
sentence naming it.

Names: user and account names are kept exactly as typed (Slurm compares them
case-sensitively with what the plugin and charge see: `job_desc.user_name`, the job's
account). Allowed: 1 to 128 characters among letters, digits and `_ . @ $ -`, not starting
with `.`, `-`, `@` or `$` (POSIX portable user names plus `user@domain` from sssd/LDAP and
`$` of machine accounts). Whitespace, control characters and anything else are refused.
"""

from __future__ import annotations

import re
import unicodedata

from slurm_quota import ledger, numbers
from slurm_quota.errors import InvalidInput

KINDS = ("user", "account")
NAME_MAX_LEN = 128
GPU_TYPE_MAX_LEN = 64
REASON_MAX_LEN = 500

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@$-]*")
_GPU_TYPE_RE = re.compile(r"[A-Za-z0-9_.-]+")
KIND_LABEL = {"user": "User", "account": "Account"}
# The plugin's settings besides the default quotas (job_submit.lua reads them).
SETTING_DEFAULT_TIME = "default_time_minutes"
SETTING_NODE_GPUS = "node_gpus"
# yes: several clusters share the ledger, and each run's charge key names its cluster.
SETTING_CLUSTER_KEYS = "cluster_keys"
_NODE_GPUS_KEY_RE = re.compile(r"node_gpus(?:\.([A-Za-z0-9_.-]{1,64}))?")
_NODE_GPU_ENTRY_RE = re.compile(r"gpu(?::([A-Za-z0-9_.-]{1,64}))?:([0-9]{1,4})")


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "…")


def parse_name(kind: str, text: str | None) -> str:
    """A user or account name, kept exactly as given; refuses what Slurm would never send."""
    label = f"{KIND_LABEL[kind]} name"
    if text is None or text == "":
        raise InvalidInput(f"{label} is empty.")
    if any(unicodedata.category(ch).startswith("C") for ch in text):
        raise InvalidInput(f"{label} {_shown(text)} contains a control character.")
    if any(ch.isspace() for ch in text):
        raise InvalidInput(f"{label} {_shown(text)} contains whitespace.")
    if len(text) > NAME_MAX_LEN:
        raise InvalidInput(f"{label} {_shown(text)} is longer than {NAME_MAX_LEN} characters.")
    if not _NAME_RE.fullmatch(text):
        raise InvalidInput(
            f"{label} {_shown(text)} is not valid: use letters, digits and _ . @ $ - "
            f"(not starting with . - @ $)."
        )
    return text


def parse_gpu_type(text: str | None) -> str:
    """A GPU type as in Slurm's gres (`h100`, `a100_80g`), or `default` (the fallback)."""
    if text is None or text == "":
        raise InvalidInput("GPU type is empty.")
    if len(text) > GPU_TYPE_MAX_LEN or not _GPU_TYPE_RE.fullmatch(text):
        raise InvalidInput(
            f"GPU type {_shown(text)} is not valid: use 1 to {GPU_TYPE_MAX_LEN} letters, "
            f"digits and _ . - (as in the node's Gres=gpu:TYPE:N)."
        )
    return text


def parse_reason(text: str | None) -> str | None:
    """The optional --reason: one line of printable text, or None."""
    if text is None:
        return None
    value = text.strip()
    if not value:
        raise InvalidInput("--reason is empty; give a short explanation or leave it out.")
    if any(unicodedata.category(ch).startswith("C") for ch in value):
        raise InvalidInput("--reason contains a control character (e.g. a newline).")
    if len(value) > REASON_MAX_LEN:
        raise InvalidInput(f"--reason is longer than {REASON_MAX_LEN} characters.")
    return value


def check_kind(kind: str) -> None:
    """ValueError unless kind is user or account (a programming error, not input)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")


def check_resource(resource: str) -> None:
    """ValueError unless resource is cpu or gpu (a programming error, not input)."""
    if resource not in ledger.RESOURCES:
        raise ValueError(f"unknown resource {resource!r}")


def check_quota(minutes: int | str) -> int:
    """A quota in whole minutes (-1 = unlimited), as typed or an int; InvalidInput otherwise."""
    if isinstance(minutes, str):
        return ledger.parse_quota(minutes)
    if isinstance(minutes, bool) or not isinstance(minutes, int):
        raise InvalidInput(f"Quota {minutes!r} is not a whole number of minutes.")
    return ledger.parse_quota(str(minutes))


def parse_adjustment(
    user: str | None, account: str | None, cpu: bool, gpu: bool, minutes: str | None,
    hours: str | None,
) -> tuple[str, str, str, int]:
    """(kind, name, resource, signed minutes) of `adjust`'s options, checked together."""
    if (user is None) == (account is None):
        raise InvalidInput("adjust needs exactly one of --user or --account.")
    if cpu == gpu:
        raise InvalidInput("adjust needs exactly one of --cpu or --gpu.")
    if (minutes is None) == (hours is None):
        raise InvalidInput("adjust needs exactly one of --minutes or --hours (signed, e.g. +30).")
    kind = "user" if user is not None else "account"
    name = parse_name(kind, user if user is not None else account)
    resource = ledger.CPU if cpu else ledger.GPU
    if minutes is not None:
        delta = ledger.parse_signed_minutes(minutes)
    else:
        delta = ledger.parse_signed_minutes(str(hours), hours=True)
    return kind, name, resource, delta


def parse_job_id(text: str | int | None) -> int | None:
    """A Slurm job id (a positive integer; an array or het job id matches its elements)."""
    if text is None:
        return None
    job_id = numbers.int_or_none(str(text))
    if job_id is None or not 0 < job_id < 2**32:
        raise InvalidInput(
            f"Job id {numbers.shown(text)} is not a Slurm job id (a positive whole number, "
            f"e.g. 12345)."
        )
    return job_id


def parse_setting(key: str, value: str | None) -> tuple[str, str | None]:
    """Validate a plugin setting; return (key, normalised value), value None to unset.

    default_time_minutes: the time limit of a job that has none and whose partition has
    neither DefaultTime nor MaxTime (whole minutes, 1 or more). node_gpus and
    node_gpus.<partition>: the GPUs of one node (`gpu:h100:2,gpu:a100:2`), which an
    --exclusive job takes; slurmctld does not tell the plugin. cluster_keys: yes when
    several clusters share the ledger (each run's charge key then names its cluster).
    """
    if key.startswith("default_") and key.endswith("_minutes") and key != SETTING_DEFAULT_TIME:
        raise InvalidInput(
            f"{_shown(key)} is a default quota: use `slurm-quota set-default-quotas`."
        )
    if key == SETTING_DEFAULT_TIME:
        if value is None:
            return key, None
        minutes = numbers.int_or_none(value)
        if minutes is None or not 1 <= minutes <= 10**7:
            raise InvalidInput(
                f"{key} must be a whole number of minutes from 1 to 10000000, not {_shown(value)}."
            )
        return key, str(minutes)
    if key == SETTING_CLUSTER_KEYS:
        if value is None:
            return key, None
        if value.strip().lower() not in ("yes", "no"):
            raise InvalidInput(f"{key} must be yes or no, not {_shown(value)}.")
        return key, value.strip().lower()
    if _NODE_GPUS_KEY_RE.fullmatch(key):
        if value is None:
            return key, None
        entries = [e.strip() for e in value.split(",")]
        parse_node_gpus(",".join(entries), key)
        return key, ",".join(entries)
    raise InvalidInput(
        f"Unknown setting {_shown(key)}: the settings are {SETTING_DEFAULT_TIME}, "
        f"{SETTING_NODE_GPUS}, {SETTING_NODE_GPUS}.<partition> and {SETTING_CLUSTER_KEYS}."
    )


def parse_node_gpus(value: str, key: str = SETTING_NODE_GPUS) -> list[tuple[str | None, int]]:
    """(type or None, count) of each entry of a node_gpus value (`gpu:h100:2,gpu:4`).

    Counts are 1 to 9999 in ASCII digits: what the plugin reads from the same text.
    """
    out: list[tuple[str | None, int]] = []
    for entry in value.split(","):
        entry = entry.strip()
        m = _NODE_GPU_ENTRY_RE.fullmatch(entry)
        count = numbers.int_or_none(m.group(2)) if m else None
        if count is None or count < 1:
            raise InvalidInput(
                f"{key}: {_shown(entry)} is not a GPU entry like gpu:h100:2 or gpu:4 "
                f"(comma-separated, as in the node's Gres=; a count from 1 to 9999)."
            )
        out.append((m.group(1), count))
    return out
