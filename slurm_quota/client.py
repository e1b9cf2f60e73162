"""The HTTP client of `slurm-quota serve`: GET /stats for `slurm-quota stats` and for a
dashboard that runs away from the ledger.

Owns: the errors a person sees when
the service does not answer, and the revalidated copy of the whole-ledger answer
(StatsCache). It must not read the ledger.
"""

from __future__ import annotations

import threading
from typing import Any

from slurm_quota import (
    DEFAULT_URL,  # noqa: F401  (the client's default, re-exported)
    identity,
)
from slurm_quota.errors import (
    InvalidInput,
    MungeUnavailable,
    NotAuthenticated,
    NotPermitted,
    ServiceUnavailable,
    SlurmQuotaError,
)
from slurm_quota.stats import check_selector, validate_payload


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
    forecast: bool = False,
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
    if forecast:
        params["forecast"] = "1"  # adds the key `forecasts` (issue 18)
    kept = cache if not params else None  # only the whole-ledger answer is kept
    etag = kept.etag(url) if kept is not None else None
    headers = {} if etag is None else {"If-None-Match": etag}
    munge_error = None
    try:
        prepared = requests.Request("GET", url, params=params, headers=headers).prepare()
        try:
            # Who asks: the service shows a user's own usage under PrivateData.
            prepared.headers.update(identity.credential_header("GET", prepared.path_url))
        except MungeUnavailable as err:
            munge_error = str(err)  # asked anonymously; said if the service needs to know
        with requests.Session() as session:
            resp = session.send(prepared, timeout=(min(timeout_s, 3.0), timeout_s))
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
    if resp.status_code == 401:
        raise NotAuthenticated(
            f"The service at {url} needs to know who you are{detail}"
            + (f" ({munge_error})" if munge_error else "")
        )
    if resp.status_code == 403:
        raise NotPermitted(f"The service at {url} refused{detail}")
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


def fetch_usage(
    base_url: str,
    *,
    username: str | None = None,
    account: str | None = None,
    bucket: str = "day",
    days: int = 60,
    timeout_s: float = 5.0,
) -> dict[str, Any]:
    """GET /usage (one owner's usage over time, issue 18); errors as fetch_stats'."""
    import requests

    url = stats_url(base_url).rsplit("/stats", 1)[0] + "/usage"
    params = {"bucket": bucket, "days": str(days)}
    if username is not None:
        params["username"] = username
    if account is not None:
        params["account"] = account
    try:
        resp = requests.get(url, params=params, timeout=(min(timeout_s, 3.0), timeout_s))
    except requests.exceptions.RequestException as err:
        raise ServiceUnavailable(
            f"The slurm-quota service at {url} did not answer ({type(err).__name__})."
        ) from err
    if resp.status_code != 200:
        raise ServiceUnavailable(
            f"The service at {url} answered HTTP {resp.status_code}{_error_detail(resp)}."
        )
    body = resp.json()
    if not isinstance(body, dict) or not isinstance(body.get("series"), list):
        raise SlurmQuotaError(f"The service at {url} returned no usage series.")
    return body
