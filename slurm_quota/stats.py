"""The read model shared by the CLI, the HTTP service and the dashboard.

Owns: the `/stats` payload (the seed system's exact keys plus a few of ours), its check
(validate_payload) and the usage thresholds every view colours by (usage_level). The
terminal tables are slurm_quota.tables', the Prometheus text slurm_quota.metrics', the HTTP
client slurm_quota.client's. It must not write to the ledger, hold SQL (that is db.py's
read-model section) or print: it returns data and strings.

The payload rows are plain dicts rather than dataclasses on purpose: they ARE the JSON
contract, and the server builds ten thousand of them per full `/stats`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from slurm_quota import db
from slurm_quota.errors import InvalidInput
from slurm_quota.ledger import UNLIMITED, available, usage_fraction

# The seed system's keys, in its order. Clients of the seed rely on every one of them.
USAGE_KEYS = (
    "total_consumed_cpu_minutes",
    "total_preallocated_cpu_minutes",
    "quota_cpu_minutes",
    "total_consumed_gpu_minutes",
    "total_preallocated_gpu_minutes",
    "quota_gpu_minutes",
    "last_updated",
    "job_count",
)
USER_KEYS = ("username", *USAGE_KEYS)
ACCOUNT_KEYS = ("account", *USAGE_KEYS)
# Ours, added after the seed's: minutes left (null when unlimited) and the percentage of the
# quota used or reserved (null when unlimited), per resource.
EXTRA_KEYS = (
    "available_cpu_minutes",
    "available_gpu_minutes",
    "usage_cpu_percent",
    "usage_gpu_percent",
)

# Usage (consumed + preallocated over the quota) above these is shown orange, then red.
WARN_PERCENT = 80.0
CRIT_PERCENT = 95.0


def usage_level(percent: float | None) -> str:
    """"ok", "warn" above WARN_PERCENT, "crit" above CRIT_PERCENT; "" when unlimited."""
    if percent is None:
        return ""
    if percent > CRIT_PERCENT:
        return "crit"
    if percent > WARN_PERCENT:
        return "warn"
    return "ok"


# ---------------------------------------------------------------------------------------
# The /stats payload
# ---------------------------------------------------------------------------------------


def _percent(quota: int, consumed: int, preallocated: int) -> float | None:
    fraction = usage_fraction(quota, consumed, preallocated)
    return None if fraction is None else round(fraction * 100.0, 2)


def payload_row(name_key: str, row: Sequence[Any]) -> dict[str, Any]:
    """One /stats row (seed keys, then ours) from a db.stats_users/stats_accounts tuple."""
    name, cpu_used, cpu_pre, cpu_quota, gpu_used, gpu_pre, gpu_quota, updated, jobs = row
    # int() once per value: a seed ledger may hold REAL minutes (its columns are untyped).
    cpu_used, cpu_pre, cpu_quota = int(cpu_used), int(cpu_pre), int(cpu_quota)
    gpu_used, gpu_pre, gpu_quota = int(gpu_used), int(gpu_pre), int(gpu_quota)
    return {
        name_key: name,
        "total_consumed_cpu_minutes": cpu_used,
        "total_preallocated_cpu_minutes": cpu_pre,
        "quota_cpu_minutes": cpu_quota,
        "total_consumed_gpu_minutes": gpu_used,
        "total_preallocated_gpu_minutes": gpu_pre,
        "quota_gpu_minutes": gpu_quota,
        "last_updated": None if updated is None else str(updated),
        "job_count": int(jobs),
        "available_cpu_minutes": available(cpu_quota, cpu_used, cpu_pre),
        "available_gpu_minutes": available(gpu_quota, gpu_used, gpu_pre),
        "usage_cpu_percent": _percent(cpu_quota, cpu_used, cpu_pre),
        "usage_gpu_percent": _percent(gpu_quota, gpu_used, gpu_pre),
    }


def check_selector(
    username: str | None = None, account: str | None = None, all_: bool = False
) -> None:
    """Refuse contradictory or empty selectors (one of username, account, all at most)."""
    chosen = [n for n, v in (("username", username), ("account", account)) if v is not None]
    if all_:
        chosen.append("all")
    if len(chosen) > 1:
        raise InvalidInput(
            f"Choose one of a user, an account or all, not {' and '.join(chosen)}."
        )
    for label, value in (("username", username), ("account", account)):
        if value is not None and not value.strip():
            raise InvalidInput(f"The {label} must not be empty.")


def stats_payload(
    conn: Any,
    *,
    username: str | None = None,
    account: str | None = None,
    all_: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """The `/stats` answer: users and accounts with consumed, preallocated and quota minutes.

    No selector (or all_) → every user and every account. `username` → that user and the
    accounts they have open jobs or charged runs in. `account` → that account only and no
    users, as the seed system answers.
    """
    check_selector(username, account, all_)
    if username is not None:
        users, accounts = db.stats_user_view(conn, username)
    elif account is not None:
        users, accounts = [], db.stats_accounts(conn, account)
    else:
        with db.read_snapshot(conn):
            users = db.stats_users(conn)
            accounts = db.stats_accounts(conn)
    return {
        "users": [payload_row("username", r) for r in users],
        "accounts": [payload_row("account", r) for r in accounts],
    }


def _json_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if type(value) is str:
        return _JSON_STRING(value)
    return json.dumps(value)


_JSON_STRING = json.encoder.encode_basestring  # what json.dumps(ensure_ascii=False) uses


def _percent_json(quota: int, used: int) -> str:
    if quota == UNLIMITED:
        return "null"
    return repr(round(used / quota * 100.0, 2)) if quota else "100.0"  # as _percent


class RowMemo:
    """The fragments rendered for the rows of the previous build, by row (the row's values
    are the key): after a change, a whole-ledger answer renders only the rows that changed, a
    few of 11k, and reuses the others' text. A fragment is a pure function of its row, so a
    memo shared by mistake gives the same bytes, only slower."""

    def __init__(self) -> None:
        self._last: dict[Any, Any] = {}

    def render(self, rows: Iterable[Any], render_row: Callable[[Any], Any]) -> list[Any]:
        last: dict[Any, Any] = self._last
        now: dict[Any, Any] = {}
        out = []
        for row in rows:
            fragment = last.get(row)
            if fragment is None:
                fragment = render_row(row)
            now[row] = fragment
            out.append(fragment)
        self._last = now  # rows gone since are dropped: the memo holds one build's rows
        return out


def _row_json(key: str, row: Sequence[Any]) -> str:
    name, cu, cp, cq, gu, gp, gq, updated, jobs = row
    cu, cp, cq, gu, gp, gq = int(cu), int(cp), int(cq), int(gu), int(gp), int(gq)
    return (
        f'{{{key}:{_json_scalar(name)},"total_consumed_cpu_minutes":{cu},'
        f'"total_preallocated_cpu_minutes":{cp},"quota_cpu_minutes":{cq},'
        f'"total_consumed_gpu_minutes":{gu},"total_preallocated_gpu_minutes":{gp},'
        f'"quota_gpu_minutes":{gq},'
        f'"last_updated":{"null" if updated is None else _JSON_STRING(str(updated))},'
        f'"job_count":{int(jobs)},'
        f'"available_cpu_minutes":{"null" if cq == UNLIMITED else cq - cu - cp},'
        f'"available_gpu_minutes":{"null" if gq == UNLIMITED else gq - gu - gp},'
        f'"usage_cpu_percent":{_percent_json(cq, cu + cp)},'
        f'"usage_gpu_percent":{_percent_json(gq, gu + gp)}}}'
    )


def rows_json(
    name_key: str, rows: Iterable[Sequence[Any]], memo: RowMemo | None = None
) -> str:
    """The JSON array of [payload_row(name_key, r) for r in rows], byte for byte as
    json.dumps(..., separators=(",", ":"), ensure_ascii=False) writes it, without building
    the dicts: a whole ledger of 11k rows in a third of the time (the whole-ledger /stats);
    with a memo holding the previous build, only the changed rows are rendered.
    """
    key = _JSON_STRING(name_key)
    if memo is None:
        parts = [_row_json(key, row) for row in rows]
    else:
        parts = memo.render(rows, lambda row: _row_json(key, row))
    return "[" + ",".join(parts) + "]"


def whole_stats_json(conn: Any, memos: tuple[RowMemo, RowMemo] | None = None) -> bytes:
    """The /stats answer without a selector as JSON bytes (every user, every account), equal
    to json.dumps(stats_payload(conn), separators=(",", ":"), ensure_ascii=False) + "\n".
    memos (the users', the accounts'): the service keeps them from one build to the next."""
    with db.read_snapshot(conn):
        users = db.stats_users(conn)
        accounts = db.stats_accounts(conn)
    user_memo, account_memo = memos if memos is not None else (None, None)
    return (
        f'{{"users":{rows_json("username", users, user_memo)},'
        f'"accounts":{rows_json("account", accounts, account_memo)}}}\n'
    ).encode()


def validate_payload(payload: Any) -> dict[str, list[dict[str, Any]]]:
    """Check an answer has the /stats shape (every seed key); raise ValueError otherwise."""
    if not isinstance(payload, dict):
        raise ValueError("the answer is not a JSON object")
    for kind, keys in (("users", USER_KEYS), ("accounts", ACCOUNT_KEYS)):
        rows = payload.get(kind)
        if not isinstance(rows, list):
            raise ValueError(f"`{kind}` is missing or not a list")
        for row in rows:
            if not isinstance(row, dict):
                raise ValueError(f"an entry of `{kind}` is not an object")
            absent = [k for k in keys if k not in row]
            if absent:
                raise ValueError(f"an entry of `{kind}` lacks {', '.join(absent)}")
            for key in keys[1:-2] + keys[-1:]:
                if not isinstance(row[key], (int, float)) or isinstance(row[key], bool):
                    raise ValueError(f"`{key}` of an entry of `{kind}` is not a number")
    return payload
