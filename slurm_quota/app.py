"""The one WSGI application of slurm-quota: the API (/health, /stats, /metrics) and the
dashboard (/, /static/...), for `slurm-quota serve`, `slurm-quota-web` and mod_wsgi alike.

Owns: the routes, query checks, JSON errors for every failure (never a traceback to a
client), gzip, entity tags and 304, HEAD and 405. The answers come from a ReadModel over the
ledger (Settings.db_path: read-only) or, for a dashboard on another host, from the service
at Settings.api_url (the API routes then answer 404: that service has them). It must not
write to the ledger or know which HTTP server runs it (slurm_quota.serve does).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs

from slurm_quota import client, db, identity, metrics, remote, roles, stats, web
from slurm_quota.errors import (
    DatabaseMissing,
    DatabaseUnavailable,
    InvalidInput,
    NotAuthenticated,
    NotFound,
    NotPermitted,
    SchemaError,
    SlurmQuotaError,
    TemporaryFailure,
)
from slurm_quota.numbers import int_or_none
from slurm_quota.readmodel import (
    GZIP_ETAG_SUFFIX,
    JSON_TYPE,
    ReadModel,
    Response,
    error_response,
    etag_matches,
    json_response,
)

log = logging.getLogger(__name__)

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HTML_TYPE = "text/html; charset=utf-8"
API_PARAMS = {
    "/health": (),
    "/stats": ("username", "account", "period", "forecast"),
    "/metrics": (),
    "/usage": ("username", "account", "bucket", "days"),
}
DASHBOARD_PARAMS = ("user", "account", "unit", "sort", "refresh", "chart")

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict, StartResponse], Iterable[bytes]]


@dataclass(frozen=True)
class Settings:
    """Where the answers come from, and the dashboard's refresh period."""

    db_path: Path | None = None  # the ledger, read-only; None: ask the service at api_url
    api_url: str = client.DEFAULT_URL  # environ SLURM_QUOTA_URL (Apache SetEnv) overrides it
    max_stale_s: float = 0.0
    refresh_s: int = web.DEFAULT_REFRESH_S
    # Who may see and change what (slurm_quota.roles); None: everyone sees everything and
    # nobody writes through the service (a dashboard away from the ledger, tests).
    roles: roles.Roles | None = None
    # Take REMOTE_USER (X-Remote-User from a proxy) as the caller: only behind a front end
    # that authenticates, with the service reachable through it alone.
    trust_remote_user: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings of `slurm-quota-web` and mod_wsgi: SLURM_QUOTA_URL, SLURM_QUOTA_WEB_REFRESH."""
        env = os.environ if env is None else env
        refresh_s = int_or_none(env.get("SLURM_QUOTA_WEB_REFRESH") or "")
        if refresh_s is None:  # unset or not a number: the default (the page says its period)
            refresh_s = web.DEFAULT_REFRESH_S
        return cls(api_url=env.get("SLURM_QUOTA_URL") or client.DEFAULT_URL, refresh_s=refresh_s)


def parse_query(path: str, query: str) -> dict[str, str]:
    """Query parameters of an API route: known names only, each once, non-empty; else
    InvalidInput. Unknown names are refused rather than ignored: `/stats?user=alice` must not
    silently answer with every user."""
    allowed = API_PARAMS[path]
    try:
        pairs = parse_qs(
            query, keep_blank_values=True, strict_parsing=bool(query), errors="strict",
            max_num_fields=8,
        )
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidInput(f"Malformed query string: {err}.") from err
    params: dict[str, str] = {}
    for name, values in pairs.items():
        if name not in allowed:
            known = ", ".join(allowed) if allowed else "none"
            raise InvalidInput(f"Unknown query parameter {name!r} for {path} (accepted: {known}).")
        if len(values) != 1:
            raise InvalidInput(f"Query parameter {name!r} is given {len(values)} times.")
        if not values[0].strip():
            raise InvalidInput(f"Query parameter {name!r} is empty.")
        if len(values[0]) > 256:
            raise InvalidInput(f"Query parameter {name!r} is longer than 256 characters.")
        params[name] = values[0]
    return params


class Routes:
    """The answers of the API routes over a ReadModel (tests call it directly too)."""

    def __init__(self, model: ReadModel) -> None:
        self.model = model
        self._parsed: tuple[str | None, Any] = (None, None)  # (tag, payload) of whole_payload
        self._parsed_lock = threading.Lock()
        # Rendered rows of the last whole-ledger builds: a rebuild after a change renders only
        # the changed rows (builds of one key run one at a time: ReadModel.cached).
        self._stats_memos = (stats.RowMemo(), stats.RowMemo())
        self._metrics_memos = {"user": stats.RowMemo(), "account": stats.RowMemo()}

    def handle(
        self, path: str, query: str, access_of: Callable[[], roles.Access] | None = None,
    ) -> Response:
        """Answer a GET of an API path for whoever access_of() says asks (None: everyone
        sees everything); every failure becomes a JSON error."""
        try:
            params = parse_query(path, query)
            access = access_of() if access_of is not None and path != "/health" else None
            if path == "/stats":
                username, account = params.get("username"), params.get("account")
                if username is not None and account is not None:
                    raise InvalidInput("Give either username or account, not both.")
                if access is not None:
                    roles.check_stats(access, username, account)
                if "forecast" in params:  # new key `forecasts` (issue 18)
                    if params["forecast"] not in ("1", "true"):
                        raise InvalidInput("Query parameter 'forecast' takes 1 or true.")
                    if "period" in params:
                        raise InvalidInput("A forecast is of the current period: no period.")
                    with self.model.connection() as conn:
                        payload = stats.stats_payload(conn, username=username, account=account)
                        if access is not None:  # forecasts of the rows the asker may see
                            payload = roles.filter_payload(payload, access)
                        payload = stats.with_forecasts(conn, payload, int(time.time()))
                    return json_response(200, payload)
                if "period" in params:  # a past period, from the archive (issue 18)
                    with self.model.connection() as conn:
                        payload = stats.period_payload(
                            conn, params["period"], username=username, account=account
                        )
                    if access is not None:
                        payload = roles.filter_payload(payload, access)
                    return json_response(200, payload)
                if username is None and account is None:
                    if access is not None and not access.sees_everything:
                        return json_response(200, roles.filter_payload(
                            self.whole_payload(), access))
                    return self.model.cached("stats", self.whole_stats)
                with self.model.connection() as conn:
                    payload = stats.stats_payload(conn, username=username, account=account)
                if access is not None:
                    payload = roles.filter_payload(payload, access)
                return json_response(200, payload)
            if path == "/metrics":
                if access is not None:
                    roles.check_metrics(access)
                return self.model.cached("metrics", self.metrics)
            if path == "/usage":  # usage over time of one owner (issue 18)
                if access is not None:
                    roles.check_stats(access, params.get("username"), params.get("account"))
                return self.usage(params)
            return self.health()
        except InvalidInput as err:
            return error_response(400, "bad_request", str(err))
        except NotFound as err:
            return error_response(404, "not_found", str(err))
        except NotAuthenticated as err:
            return error_response(401, "unauthorized", str(err))
        except NotPermitted as err:
            return error_response(403, "forbidden", str(err))
        except TemporaryFailure as err:
            log.warning("request %s?%s: %s", path, query[:200], err)
            return error_response(503, "unavailable", str(err))
        except (DatabaseMissing, DatabaseUnavailable, SchemaError) as err:
            log.warning("database unavailable: %s", err)
            return error_response(503, "unavailable", str(err))
        except SlurmQuotaError as err:
            log.error("request %s?%s failed: %s", path, query[:200], err)
            return error_response(500, "internal", str(err))
        except Exception:  # a bug: log it for the admin, never show a traceback to clients
            log.exception("request %s?%s failed", path, query[:200])
            return error_response(500, "internal", "Internal error; see the service log.")

    def whole_stats(self) -> Response:
        """GET /stats without a selector: every user and every account."""
        with self.model.connection() as conn:
            return Response(200, JSON_TYPE, stats.whole_stats_json(conn, self._stats_memos))

    def metrics(self) -> Response:
        """GET /metrics (Prometheus text format 0.0.4)."""
        with self.model.connection() as conn:
            text = metrics.metrics_text(
                conn, db_path=self.model.db_path, memos=self._metrics_memos
            )
        return Response(200, METRICS_TYPE, text.encode())

    def usage(self, params: Mapping[str, str]) -> Response:
        """GET /usage?username=|account=[&bucket=day|week][&days=N]: slurm_quota.usage."""
        from slurm_quota import numbers, usage

        days_text = params.get("days", str(usage.DEFAULT_DAYS))
        days = numbers.int_or_none(days_text)
        if days is None:
            raise InvalidInput(f"days must be a whole number, not {numbers.shown(days_text)}.")
        with self.model.connection() as conn:
            payload = usage.usage_payload(
                conn, username=params.get("username"), account=params.get("account"),
                bucket=params.get("bucket", "day"), days=days, now=int(time.time()),
            )  # fmt: skip
        return json_response(200, payload)

    def health(self) -> Response:
        """GET /health: ok when the ledger is readable with the expected schema."""
        with self.model.connection() as conn:
            version = db.ping(conn)
        return json_response(200, {"status": "ok", "schema_version": version})

    def whole_payload(self) -> dict[str, Any]:
        """The whole-ledger /stats payload as data (the dashboard's), parsed once per change."""
        response = self.model.cached("stats", self.whole_stats)
        if response.status != 200:
            raise DatabaseUnavailable(json.loads(response.body)["message"])
        with self._parsed_lock:
            if self._parsed[0] != response.etag:
                self._parsed = (response.etag, json.loads(response.body))
            return self._parsed[1]


def _send(
    start_response: StartResponse, environ: Mapping[str, Any], response: Response,
    extra: tuple[tuple[str, str], ...] = (),
) -> list[bytes]:
    """A Response as a WSGI answer: gzip if accepted, 304 for a matching tag, no body on HEAD."""
    body, tag, status = response.body, response.etag, response.status
    etag = tag
    zipped = response.gzipped is not None and "gzip" in str(
        environ.get("HTTP_ACCEPT_ENCODING", ""))
    if zipped and response.gzipped is not None:
        body = response.gzipped
        if tag is not None:
            etag = tag[:-1] + GZIP_ETAG_SUFFIX + '"'
    if tag is not None and status == 200 and etag_matches(
            str(environ.get("HTTP_IF_NONE_MATCH", "")), tag):
        status, body = 304, b""  # the client's copy holds these very bytes
    headers = []
    if status != 304:
        headers += [("Content-Type", response.content_type), ("Content-Length", str(len(body)))]
    if response.gzipped is not None:
        headers.append(("Vary", "Accept-Encoding"))
        if zipped and status != 304:
            headers.append(("Content-Encoding", "gzip"))
    if etag is not None:
        headers += [("ETag", etag), ("Cache-Control", "no-cache")]  # kept, if checked first
    elif not any(name == "Cache-Control" for name, _ in (*response.headers, *extra)):
        headers.append(("Cache-Control", "no-store"))
    headers += [("X-Content-Type-Options", "nosniff"), *response.headers, *extra]
    start_response(f"{status} {_PHRASES.get(status, 'Error')}", headers)
    return [] if environ.get("REQUEST_METHOD") == "HEAD" or status == 304 else [body]


_PHRASES = {
    200: "OK", 304: "Not Modified", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
    503: "Service Unavailable",
}


def create_app(settings: Settings) -> WSGIApp:
    """The WSGI application for settings."""
    routes = Routes(ReadModel(settings.db_path, max_stale_s=settings.max_stale_s)) \
        if settings.db_path is not None else None
    cache = client.StatsCache() if routes is None else None

    def source(environ: Mapping[str, Any]) -> tuple[str, Callable[..., dict[str, Any]]]:
        """Where the dashboard's data comes from: a label and a fetch(**selector)."""
        if routes is not None:
            def local(**selector: str) -> dict[str, Any]:
                if not selector:
                    return routes.whole_payload()
                with routes.model.connection() as conn:
                    return stats.stats_payload(conn, **selector)
            return f"the ledger {settings.db_path}", local
        url = str(environ.get("SLURM_QUOTA_URL") or settings.api_url)
        return url, lambda **selector: client.fetch_stats(url, cache=cache, **selector)

    def usage_charts(
        environ: Mapping[str, Any], query: Mapping[str, str], payload: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        """/usage answers for the user and account the filters name exactly (issue 18)."""
        from slurm_quota import usage

        bucket = "week" if query.get("chart") == "week" else "day"
        wanted = []
        user_q, account_q = query.get("user", "").strip(), query.get("account", "").strip()
        if user_q and any(r["username"] == user_q for r in payload["users"]):
            wanted.append({"username": user_q})
        if account_q and any(r["account"] == account_q for r in payload["accounts"]):
            wanted.append({"account": account_q})
        days = 26 * 7 if bucket == "week" else usage.DEFAULT_DAYS
        out = []
        for selector in wanted:
            if routes is not None:
                with routes.model.connection() as conn:
                    out.append(usage.usage_payload(
                        conn, bucket=bucket, days=days, now=int(time.time()), **selector))
            else:
                url = str(environ.get("SLURM_QUOTA_URL") or settings.api_url)
                out.append(client.fetch_usage(url, bucket=bucket, days=days, **selector))
        return out

    def dashboard(
        environ: Mapping[str, Any], start_response: StartResponse,
        access_of: Callable[[], roles.Access],
    ) -> list[bytes]:
        raw = parse_qs(str(environ.get("QUERY_STRING", "")), keep_blank_values=True)
        query = {k: v[0][:256] for k, v in raw.items() if k in DASHBOARD_PARAMS and v}
        refresh_s = int_or_none(query.get("refresh") or "")
        refresh_s = settings.refresh_s if refresh_s is None else min(refresh_s, 86400)
        label, fetch = source(environ)
        status, payload, user_accounts, error, charts = 200, None, None, None, []
        try:
            if routes is not None and settings.roles is not None:
                access = access_of()
                roles.check_stats(access, None, None)
                unfiltered = fetch

                def fetch(**selector: str) -> dict[str, Any]:  # noqa: F811 - the filtered one
                    return roles.filter_payload(unfiltered(**selector), access)
            payload = fetch()
            user_q = query.get("user", "").strip()
            if user_q and any(r["username"] == user_q for r in payload["users"]):
                user_accounts = fetch(username=user_q)["accounts"]
            charts = usage_charts(environ, query, payload)
        except (NotAuthenticated, NotPermitted) as err:
            status, error = (401 if isinstance(err, NotAuthenticated) else 403), str(err)
        except SlurmQuotaError as err:
            status, error = 503, str(err)
        page = web.render_page(
            payload, query=query, base=str(environ.get("SCRIPT_NAME", "")).rstrip("/") + "/",
            api_url=label, refresh_s=refresh_s, error=error, user_accounts=user_accounts,
            charts=charts,
        )
        return _send(start_response, environ, Response(
            status, HTML_TYPE, page.encode(), headers=(("Cache-Control", "no-store"),)))

    def who(environ: Mapping[str, Any], body: bytes = b"") -> identity.Identity:
        """The caller; CredentialRefused (401) for a credential that proves nothing."""
        return identity.from_request(
            dict(environ), body, trust_remote_user=settings.trust_remote_user)

    def access_of(caller: identity.Identity) -> Callable[[], roles.Access]:
        """Resolved on first use: only routes that show or change usage ask Slurm."""
        def resolve() -> roles.Access:
            if settings.roles is None:
                return roles.Access(name=caller.name, role=roles.USER, private=False)
            return settings.roles.access(caller)
        return resolve

    def write(environ: Mapping[str, Any], command: str) -> Response:
        """POST /admin/<command>: one admin write for an authenticated admin or operator."""
        try:
            body = _read_body(environ)
            caller = who(environ, body)
            access = access_of(caller)()
            remote.refuse_unless_writer(command, access)
            args = remote.parse_body(body)
            assert settings.db_path is not None
            conn = db.connect(settings.db_path, intact=True)
            try:
                result = remote.execute(conn, command, args, actor=str(caller.name))
            finally:
                conn.close()
            log.info("admin write %s by %s (%s)", command, caller.name, access.role)
            return json_response(200, {"result": remote.result_to_json(result)})
        except SlurmQuotaError as err:
            status = remote.status_of(err)
            if status >= 500:
                log.error("admin write %s failed: %s", command, err)
            return json_response(status, remote.error_body(err))
        except Exception:  # a bug: log it for the admin, never show a traceback to clients
            log.exception("admin write %s failed", command)
            return error_response(500, "internal", "Internal error; see the service log.")

    def application(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        raw_path = str(environ.get("PATH_INFO", "") or "/")
        path = raw_path.rstrip("/") or "/"
        if path.startswith(remote.ADMIN_PREFIX) and routes is not None:
            if method != "POST":
                return _send(start_response, environ, error_response(
                    405, "method_not_allowed", f"Method {method[:20]} is not allowed; use POST."),
                    (("Allow", "POST"),))
            return _send(start_response, environ, write(environ, path[len(remote.ADMIN_PREFIX):]))
        if method not in ("GET", "HEAD"):
            return _send(start_response, environ, error_response(
                405, "method_not_allowed", f"Method {method[:20]} is not allowed; use GET."),
                (("Allow", "GET, HEAD"),))
        try:
            caller = who(environ)
        except NotAuthenticated as err:
            return _send(start_response, environ, error_response(401, "unauthorized", str(err)))
        except TemporaryFailure as err:
            return _send(start_response, environ, error_response(503, "unavailable", str(err)))
        if path in API_PARAMS and routes is not None:
            response = routes.handle(
                path, str(environ.get("QUERY_STRING", "")),
                access_of(caller) if settings.roles is not None else None)
            return _send(start_response, environ, response)
        if path == "/":
            return dashboard(environ, start_response, access_of(caller))
        static = web.static_file(raw_path)
        if static is not None:
            ctype, body = static
            return _send(start_response, environ, Response(
                200, ctype, body, headers=(("Cache-Control", "max-age=300"),)))
        return _send(start_response, environ, error_response(
            404, "not_found", f"No route {raw_path[:200]}."))

    return application


def _read_body(environ: Mapping[str, Any]) -> bytes:
    """The request body (the server bounds its size: serve.MAX_BODY_BYTES)."""
    try:
        length = int(str(environ.get("CONTENT_LENGTH") or 0))
    except ValueError as err:
        raise InvalidInput("Content-Length is not a number.") from err
    if length <= 0:
        return b""
    return environ["wsgi.input"].read(length)


_default: WSGIApp | None = None
_default_lock = threading.Lock()


def application(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
    """The dashboard for mod_wsgi and other WSGI servers (Settings.from_env(), made on the
    first request)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = create_app(Settings.from_env())
    return _default(environ, start_response)
