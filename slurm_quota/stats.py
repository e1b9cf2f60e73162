"""Read models shared by the CLI, the HTTP server and the dashboard.

Owns: the `/stats` payload (the seed system's exact keys plus a few of ours), the terminal
tables of `slurm-quota stats` (one renderer for the local and the HTTP mode), the Prometheus
text of `/metrics`, and the HTTP client of the service. It must not write to the ledger, hold
SQL (that is db.py's read-model section) or print: it returns data and strings.

The payload rows are plain dicts rather than dataclasses on purpose: they ARE the JSON
contract, and the server builds ten thousand of them per full `/stats`.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from slurm_quota import db
from slurm_quota.errors import InvalidInput, ServiceUnavailable, SlurmQuotaError
from slurm_quota.ledger import UNLIMITED, available, usage_fraction

DEFAULT_URL = "http://127.0.0.1:9911/"

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

BAR_CELLS = 20
WARN_PERCENT = 80.0
CRIT_PERCENT = 95.0
_GREEN = "\x1b[32m"
_ORANGE = "\x1b[38;5;208m"
_RED = "\x1b[31m"
_RESET = "\x1b[0m"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ---------------------------------------------------------------------------------------
# The /stats payload
# ---------------------------------------------------------------------------------------


def _percent(quota: int, consumed: int, preallocated: int) -> float | None:
    fraction = usage_fraction(quota, consumed, preallocated)
    return None if fraction is None else round(fraction * 100.0, 2)


def _row(name_key: str, row: Sequence[Any]) -> dict[str, Any]:
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
        "users": [_row("username", r) for r in users],
        "accounts": [_row("account", r) for r in accounts],
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


def rows_json(name_key: str, rows: Iterable[Sequence[Any]]) -> str:
    """The JSON array of [_row(name_key, r) for r in rows], byte for byte as
    json.dumps(..., separators=(",", ":"), ensure_ascii=False) writes it, without building
    the dicts: a whole ledger of 11k rows in a third of the time (the whole-ledger /stats).
    """
    key = _JSON_STRING(name_key)
    parts = []
    for name, cu, cp, cq, gu, gp, gq, updated, jobs in rows:
        cu, cp, cq, gu, gp, gq = int(cu), int(cp), int(cq), int(gu), int(gp), int(gq)
        parts.append(
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
    return "[" + ",".join(parts) + "]"


def whole_stats_json(conn: Any) -> bytes:
    """The /stats answer without a selector as JSON bytes (every user, every account), equal
    to json.dumps(stats_payload(conn), separators=(",", ":"), ensure_ascii=False) + "\n"."""
    with db.read_snapshot(conn):
        users = db.stats_users(conn)
        accounts = db.stats_accounts(conn)
    return (
        f'{{"users":{rows_json("username", users)},'
        f'"accounts":{rows_json("account", accounts)}}}\n'
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


# ---------------------------------------------------------------------------------------
# Terminal tables (seed layout)
# ---------------------------------------------------------------------------------------


def color_wanted(mode: str = "auto", *, isatty: bool = True) -> bool:
    """Colour decision: never/always, or auto = a terminal and NO_COLOR unset or empty."""
    if mode == "never":
        return False
    if mode == "always":
        return True
    return isatty and not os.environ.get("NO_COLOR")


def usage_bar(
    consumed: int, preallocated: int, quota: int, *, color: bool = True
) -> str:
    """STATUS cell: 20 cells of █/░ for (consumed+prealloc)/quota and the percentage."""
    fraction = usage_fraction(quota, consumed, preallocated)
    if fraction is None:
        return "-"
    percent = fraction * 100.0
    filled = min(BAR_CELLS, max(0, int(math.floor(fraction * BAR_CELLS + 0.5))))
    text = "█" * filled + "░" * (BAR_CELLS - filled) + f" {percent:5.1f}%"
    if not color:
        return text
    if percent > CRIT_PERCENT:
        code = _RED
    elif percent > WARN_PERCENT:
        code = _ORANGE
    else:
        code = _GREEN
    return f"{code}{text}{_RESET}"


def format_minutes(minutes: float, *, hours: bool = False) -> str:
    """A minute amount for display: as is, or /60 with 2 decimals under --hours."""
    if hours:
        return f"{minutes / 60.0:.2f}"
    return str(int(minutes)) if float(minutes).is_integer() else f"{minutes:.2f}"


def format_quota_value(quota: int, *, hours: bool = False) -> str:
    """A quota for display: ∞ for unlimited (−1)."""
    return "∞" if int(quota) == UNLIMITED else format_minutes(quota, hours=hours)


def local_time(stamp: str | None) -> str:
    """A stored UTC timestamp (SQLite CURRENT_TIMESTAMP) shown in local time."""
    if not stamp:
        return "-"
    text = str(stamp).strip().replace("T", " ")
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return str(stamp)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _visible_len(text: str) -> int:
    return len(_ANSI.sub("", text))


def _pad(text: str, width: int, align: str) -> str:
    gap = width - _visible_len(text)
    if gap <= 0:
        return text
    return " " * gap + text if align == "right" else text + " " * gap


def _kind_table(
    title: str, name_key: str, rows: Iterable[Mapping[str, Any]], *, hours: bool, color: bool
) -> str:
    unit = "hours" if hours else "minutes"
    sub = ["CONSUMED", "PREALLOC(JOBS)", "QUOTA", "STATUS"]
    header = [title, *sub, *sub, "LAST UPDATED"]
    aligns = ["left"] + ["right", "right", "right", "left"] * 2 + ["left"]
    body: list[list[str]] = []
    for r in rows:
        jobs = int(r["job_count"])
        line = [str(r[name_key])]
        for res in ("cpu", "gpu"):
            used = r[f"total_consumed_{res}_minutes"]
            pre = r[f"total_preallocated_{res}_minutes"]
            quota = r[f"quota_{res}_minutes"]
            line += [
                format_minutes(used, hours=hours),
                f"{format_minutes(pre, hours=hours)}({jobs})",
                format_quota_value(quota, hours=hours),
                usage_bar(int(used), int(pre), int(quota), color=color),
            ]
        line.append(local_time(r.get("last_updated")))
        body.append(line)
    widths = [max(_visible_len(row[i]) for row in [header, *body]) for i in range(len(header))]
    sep = "  "
    group_sep = " │ "

    def join(cells: list[str]) -> str:
        parts = [_pad(c, widths[i], aligns[i]) for i, c in enumerate(cells)]
        return (
            parts[0]
            + group_sep
            + sep.join(parts[1:5])
            + group_sep
            + sep.join(parts[5:9])
            + group_sep
            + parts[9]
        ).rstrip()

    group_w = sum(widths[1:5]) + len(sep) * 3
    groups = (
        " " * widths[0]
        + group_sep
        + f" CPU ({unit}) ".center(group_w, "─")
        + group_sep
        + f" GPU ({unit}) ".center(sum(widths[5:9]) + len(sep) * 3, "─")
        + group_sep.rstrip()
    )
    rule = "─" * widths[0] + "─┼─" + "─" * group_w + "─┼─"
    rule += "─" * (sum(widths[5:9]) + len(sep) * 3) + "─┼─" + "─" * widths[9]
    lines = [groups.rstrip(), join(header), rule]
    lines += [join(row) for row in body]
    return "\n".join(lines)


def render_tables(
    payload: Mapping[str, Any],
    *,
    hours: bool = False,
    color: bool = True,
    selector: tuple[str, str] | None = None,
) -> str:
    """The `stats` tables: one per non-empty kind (USER, ACCOUNT), seed layout.

    `selector` = ("user", name) or ("account", name) names what was asked for, so that an
    empty answer reads "No data found for user: X"; without it, "No data found.".
    """
    users = list(payload.get("users") or [])
    accounts = list(payload.get("accounts") or [])
    parts: list[str] = []
    if selector is not None:
        kind, name = selector
        wanted = users if kind == "user" else accounts
        if not wanted:
            parts.append(f"No data found for {kind}: {name}")
    elif not users and not accounts:
        parts.append("No data found.")
    if users:
        parts.append(_kind_table("USER", "username", users, hours=hours, color=color))
    if accounts:
        parts.append(_kind_table("ACCOUNT", "account", accounts, hours=hours, color=color))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------
# Prometheus text (/metrics)
# ---------------------------------------------------------------------------------------


def _escape_label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float | int | None) -> str:
    if value is None or int(value) == UNLIMITED:
        return "+Inf"
    return str(int(value))


class _Family:
    """One metric family: HELP and TYPE lines, then its samples."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        self.name = name

    def add(self, labels: Mapping[str, str], value: str) -> None:
        if labels:
            inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{self.name}{{{inner}}} {value}")
        else:
            self.lines.append(f"{self.name} {value}")


def metrics_text(conn: Any, *, db_path: str | os.PathLike[str] | None = None) -> str:
    """Prometheus text exposition (format 0.0.4) of the whole ledger.

    Per user and per account (label `username` / `account`, `resource` = cpu|gpu): consumed,
    preallocated and quota minutes (quota +Inf when unlimited), open jobs; charges total and
    charged minutes; rows per table; size of the database files.
    """
    with db.read_snapshot(conn):
        users = db.stats_users(conn)
        accounts = db.stats_accounts(conn)
        counts = db.ledger_row_counts(conn)
        charges, charged_cpu, charged_gpu = db.charge_totals(conn)
        version = db.ping(conn)
    families: list[_Family] = []
    for kind, label, rows in (("user", "username", users), ("account", "account", accounts)):
        consumed = _Family(
            f"slurm_quota_{kind}_consumed_minutes",
            "gauge",
            f"Minutes charged to the {kind} by completed jobs.",
        )
        prealloc = _Family(
            f"slurm_quota_{kind}_preallocated_minutes",
            "gauge",
            f"Minutes reserved by the {kind}'s open jobs (amount x array elements).",
        )
        quota = _Family(
            f"slurm_quota_{kind}_quota_minutes",
            "gauge",
            f"Quota of the {kind} in minutes (+Inf when unlimited).",
        )
        jobs = _Family(
            f"slurm_quota_{kind}_open_jobs",
            "gauge",
            f"Open jobs (array elements not yet charged) of the {kind}.",
        )
        # Samples written directly (11k rows, 77k lines at 10k users): the label of a row is
        # escaped once, not once per sample.
        for name, cu, cp, cq, gu, gp, gq, _updated, njobs in rows:
            owner = f'{label}="{_escape_label(name)}"'
            cpu, gpu = f'{{{owner},resource="cpu"}} ', f'{{{owner},resource="gpu"}} '
            consumed.lines += (
                f"{consumed.name}{cpu}{_number(cu)}", f"{consumed.name}{gpu}{_number(gu)}"
            )
            prealloc.lines += (
                f"{prealloc.name}{cpu}{_number(cp)}", f"{prealloc.name}{gpu}{_number(gp)}"
            )
            quota.lines += (f"{quota.name}{cpu}{_number(cq)}", f"{quota.name}{gpu}{_number(gq)}")
            jobs.lines.append(f"{jobs.name}{{{owner}}} {int(njobs)}")
        families += [consumed, prealloc, quota, jobs]
    total = _Family("slurm_quota_charges_total", "counter", "Job runs charged so far.")
    total.add({}, str(charges))
    minutes = _Family(
        "slurm_quota_charged_minutes_total", "counter", "Minutes charged so far, by resource."
    )
    minutes.add({"resource": "cpu"}, str(charged_cpu))
    minutes.add({"resource": "gpu"}, str(charged_gpu))
    rows_f = _Family("slurm_quota_ledger_rows", "gauge", "Rows in each ledger table.")
    for table in sorted(counts):
        rows_f.add({"table": table}, str(counts[table]))
    families += [total, minutes, rows_f]
    if db_path is not None:
        size = _Family(
            "slurm_quota_ledger_file_bytes", "gauge", "Size of the SQLite files of the ledger."
        )
        for suffix, label in (("", "db"), ("-wal", "wal"), ("-shm", "shm")):
            try:
                size.add({"file": label}, str(os.stat(f"{db_path}{suffix}").st_size))
            except OSError:
                continue
        families.append(size)
    schema = _Family("slurm_quota_schema_version", "gauge", "PRAGMA user_version of the ledger.")
    schema.add({}, str(version))
    families.append(schema)
    return "\n".join(line for f in families for line in f.lines) + "\n"


# ---------------------------------------------------------------------------------------
# HTTP client of `slurm-quota serve`
# ---------------------------------------------------------------------------------------


def stats_url(base_url: str) -> str:
    """The /stats address under a base URL such as http://controller:9911/."""
    base = base_url.strip()
    if not base.endswith("/"):
        base += "/"
    return base + "stats"


class StatsCache:
    """The last whole-ledger /stats answer per URL with its entity tag, for a client that
    asks again and again (the dashboard, every page view and refresh): while the ledger is
    unchanged the service answers 304 and the copy is used, instead of 4 MB sent and parsed
    at 10k users. Safe to share between threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[str, dict[str, list[dict[str, Any]]]]] = {}
        self.revalidated = 0  # answers served from the copy after a 304

    def etag(self, url: str) -> str | None:
        with self._lock:
            entry = self._entries.get(url)
        return entry[0] if entry is not None else None

    def get(self, url: str) -> dict[str, list[dict[str, Any]]] | None:
        with self._lock:
            entry = self._entries.get(url)
            if entry is None:
                return None
            self.revalidated += 1
            return entry[1]

    def put(self, url: str, etag: str | None, payload: dict[str, list[dict[str, Any]]]) -> None:
        with self._lock:
            if etag:
                self._entries[url] = (etag, payload)
            else:
                self._entries.pop(url, None)


def fetch_stats(
    base_url: str,
    *,
    username: str | None = None,
    account: str | None = None,
    timeout_s: float = 5.0,
    cache: StatsCache | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """GET /stats from the service; ServiceUnavailable (exit 75) when it does not answer.

    cache: keeps the whole-ledger answer (no selector) and asks the service whether it
    changed (If-None-Match) rather than for all of it again. The payload returned from the
    cache is the same object each time: callers must not change it.
    """
    check_selector(username, account)
    import requests  # lazy: keeps `slurm-quota --help` fast

    url = stats_url(base_url)
    params = {}
    if username is not None:
        params["username"] = username
    if account is not None:
        params["account"] = account
    kept = cache if not params else None  # only the whole-ledger answer is kept
    etag = kept.etag(url) if kept is not None else None
    headers = {} if etag is None else {"If-None-Match": etag}
    try:
        resp = requests.get(
            url, params=params, headers=headers, timeout=(min(timeout_s, 3.0), timeout_s)
        )
    except requests.exceptions.InvalidURL as err:
        raise InvalidInput(f"SLURM_QUOTA_URL {base_url!r} is not a valid URL: {err}.") from err
    except (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema) as err:
        raise InvalidInput(
            f"SLURM_QUOTA_URL {base_url!r} is not an http:// or https:// URL."
        ) from err
    except requests.exceptions.RequestException as err:
        raise ServiceUnavailable(
            f"The slurm-quota service at {url} did not answer ({type(err).__name__}). "
            "Is slurm-quota.socket running on the controller, and is SLURM_QUOTA_URL right?"
        ) from err
    if resp.status_code == 304 and etag is not None and kept is not None:
        copy = kept.get(url)
        if copy is not None:
            return copy
    detail = _error_detail(resp)
    if resp.status_code in (502, 503, 504):
        raise ServiceUnavailable(
            f"The slurm-quota service at {url} is unavailable (HTTP {resp.status_code})"
            f"{detail}. Try again later."
        )
    if 400 <= resp.status_code < 500 and resp.status_code != 404:
        raise InvalidInput(f"The service at {url} refused the request{detail}.")
    if resp.status_code != 200:
        raise SlurmQuotaError(
            f"The service at {url} answered HTTP {resp.status_code}{detail}; "
            "is SLURM_QUOTA_URL the address of slurm-quota serve?"
        )
    try:
        payload = validate_payload(resp.json())
    except ValueError as err:
        raise SlurmQuotaError(
            f"The service at {url} returned an answer that is not slurm-quota statistics "
            f"({err}); is SLURM_QUOTA_URL the address of slurm-quota serve?"
        ) from err
    if kept is not None:
        kept.put(url, resp.headers.get("ETag"), payload)
    return payload


def _error_detail(resp: Any) -> str:
    if resp.status_code == 200:
        return ""
    try:
        body = resp.json()
    except ValueError:
        return ""
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return f": {body['message']}"
    return ""
