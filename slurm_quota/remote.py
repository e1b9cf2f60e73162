"""Admin writes from any host: the commands that change quotas, GPU factors, defaults,
consumption and settings, run the same way by root on the controller (directly on the
ledger) and by the service for an admin or operator whose MUNGE credential it checked.

Owns: the table of write commands and their arguments (the raw text a person typed; every
value is checked once, in slurm_quota.admin / slurm_quota.validate, wherever it runs), the
request and answer of `POST /admin/<command>`, and turning an answer back into the same
result or the same error (class, message, exit code) as on the controller. The journal names
the authenticated user on the service, the real uid (plus sudo user) on the controller. It
must not format anything for a person (slurm_quota.cli does).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from slurm_quota import admin, errors, identity, validate
from slurm_quota.errors import InvalidInput, NotAuthenticated, NotPermitted, SlurmQuotaError

log = logging.getLogger(__name__)

ADMIN_PREFIX = "/admin/"
QUOTA_COMMANDS = {
    "user-quota": ("user", "cpu"),
    "user-gpu-quota": ("user", "gpu"),
    "account-quota": ("account", "cpu"),
    "account-gpu-quota": ("account", "gpu"),
}
# command -> the arguments it takes (each a string, a flag or None).
ARGS: dict[str, tuple[str, ...]] = {
    **{name: ("name", "minutes", "reason") for name in QUOTA_COMMANDS},
    "adjust": ("user", "account", "cpu", "gpu", "minutes", "hours", "reason"),
    "set-default-quotas": ("user_cpu", "user_gpu", "account_cpu", "account_gpu", "reason"),
    "set-gpu-factor": ("gpu_type", "factor", "reason"),
    "set-setting": ("key", "value", "reason"),
}
FLAGS = ("cpu", "gpu")


def check_args(command: str, args: Any) -> dict[str, Any]:
    """The arguments of command as sent: known names, strings (flags: booleans) or null."""
    if command not in ARGS:
        raise InvalidInput(
            f"Unknown admin command {command[:60]!r}; known: {', '.join(sorted(ARGS))}."
        )
    if not isinstance(args, dict):
        raise InvalidInput("The request body must be a JSON object of arguments.")
    unknown = sorted(set(args) - set(ARGS[command]))
    if unknown:
        raise InvalidInput(f"Unknown argument(s) for {command}: {', '.join(unknown)[:200]}.")
    out: dict[str, Any] = {}
    for name in ARGS[command]:
        value = args.get(name)
        if name in FLAGS:
            if not isinstance(value, bool):
                raise InvalidInput(f"Argument {name} of {command} must be true or false.")
        elif value is not None and not isinstance(value, str):
            raise InvalidInput(f"Argument {name} of {command} must be text or null.")
        out[name] = value
    return out


def execute(conn: Any, command: str, args: dict[str, Any], *, actor: str) -> Any:
    """Run one write command on conn, journaled as actor; the result record."""
    args = check_args(command, args)
    reason = args.get("reason")
    if command in QUOTA_COMMANDS:
        kind, resource = QUOTA_COMMANDS[command]
        return admin.set_quota(
            conn,
            kind,
            str(args["name"] or ""),
            resource,
            str(args["minutes"] or ""),
            reason=reason,
            actor=actor,
        )
    if command == "adjust":
        kind, name, resource, delta = validate.parse_adjustment(
            args["user"], args["account"], args["cpu"], args["gpu"], args["minutes"], args["hours"]
        )
        return admin.adjust(conn, kind, name, resource, delta, reason=reason, actor=actor)
    if command == "set-default-quotas":
        return admin.set_default_quotas(
            conn,
            user_cpu=args["user_cpu"],
            user_gpu=args["user_gpu"],
            account_cpu=args["account_cpu"],
            account_gpu=args["account_gpu"],
            reason=reason,
            actor=actor,
        )
    if command == "set-gpu-factor":
        return admin.set_gpu_factor(
            conn, str(args["gpu_type"] or ""), str(args["factor"] or ""), reason=reason, actor=actor
        )
    return admin.set_setting(
        conn, str(args["key"] or ""), args["value"], reason=reason, actor=actor
    )


def result_to_json(result: Any) -> Any:
    """A result record (or a list of them) as JSON data."""
    if isinstance(result, list):
        return [asdict(r) for r in result]
    return asdict(result)


_RESULT_TYPES: dict[str, Callable[..., Any]] = {
    **{name: admin.QuotaChange for name in QUOTA_COMMANDS},
    "adjust": admin.Adjustment,
    "set-default-quotas": admin.DefaultChange,
    "set-gpu-factor": admin.FactorChange,
    "set-setting": admin.SettingChange,
}


def result_from_json(command: str, data: Any) -> Any:
    """The result record of command from its JSON data."""
    make = _RESULT_TYPES[command]
    try:
        if isinstance(data, list):
            return [make(**item) for item in data]
        return make(**data)
    except TypeError as err:
        raise SlurmQuotaError(
            f"The service's answer to {command} is not a slurm-quota result ({err})."
        ) from err


# ---------------------------------------------------------------------------------------
# The service's side
# ---------------------------------------------------------------------------------------

STATUS_OF = (
    (InvalidInput, 400),
    (NotAuthenticated, 401),
    (NotPermitted, 403),
    (errors.NotFound, 404),
    (errors.TemporaryFailure, 503),
)


def status_of(err: SlurmQuotaError) -> int:
    """The HTTP status of an error met while answering a write."""
    for cls, status in STATUS_OF:
        if isinstance(err, cls):
            return status
    return 500


def error_body(err: SlurmQuotaError) -> dict[str, Any]:
    """The JSON answer of a refused or failed write: enough to raise the same error again."""
    return {
        "error": type(err).__name__,
        "message": str(err),
        "exit_code": err.exit_code,
    }


def refuse_unless_writer(command: str, access: Any) -> None:
    """NotAuthenticated / NotPermitted unless access may change the ledger."""
    if access.name is None:
        raise NotAuthenticated(
            f"`slurm-quota {command}` needs to know who you are: send a MUNGE credential "
            "(the slurm-quota command does; is munged running on this host?). Nothing was "
            "changed."
        )
    if not access.may_write:
        raise NotPermitted(
            f"`slurm-quota {command}` changes the ledger and is restricted to Slurm "
            f"administrators and operators (AdminLevel Administrator or Operator, root, "
            f"SlurmUser); you are {access.describe()}. Nothing was changed."
        )


def parse_body(body: bytes) -> Any:
    """The JSON arguments of a write request."""
    try:
        return json.loads(body.decode("utf-8")) if body.strip() else {}
    except (UnicodeDecodeError, ValueError) as err:
        raise InvalidInput(f"The request body is not JSON: {err}.") from err


# ---------------------------------------------------------------------------------------
# The CLI's side
# ---------------------------------------------------------------------------------------


def admin_url(base_url: str, command: str) -> str:
    """POST address of command under the service's base URL."""
    base = base_url.strip()
    if not base.endswith("/"):
        base += "/"
    return base + ADMIN_PREFIX.lstrip("/") + command


def perform(
    ledger: Callable[[], Any], command: str, args: dict[str, Any], *, url: str
) -> Any:
    """Run a write command: directly on the ledger (ledger() names it: a path or the
    configuration's MariaDB ledger) as root, else through the service at url as the user
    MUNGE vouches for. The same result record, or the same error, either way. ledger() is
    called only for root: another user may not be able to read the configuration file."""
    if os.getuid() == 0:
        from slurm_quota import access, db

        conn = db.connect(ledger(), intact=True)
        try:
            return execute(conn, command, args, actor=access.current_actor())
        finally:
            conn.close()
    return send(url, command, args)


_ERROR_CLASSES = {
    name: cls
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, SlurmQuotaError)
}


def send(url: str, command: str, args: dict[str, Any], *, timeout_s: float = 30.0) -> Any:
    """POST one write to the service; its result, or its error raised here."""
    import requests  # lazy: keeps `slurm-quota --help` fast

    from slurm_quota.errors import ServiceUnavailable

    check_args(command, args)
    target = admin_url(url, command)
    body = json.dumps(args, sort_keys=True).encode()
    try:
        prepared = requests.Request(
            "POST", target, data=body, headers={"Content-Type": "application/json"}
        ).prepare()
    except (
        requests.exceptions.InvalidURL,
        requests.exceptions.MissingSchema,
        requests.exceptions.InvalidSchema,
    ) as err:
        raise InvalidInput(f"SLURM_QUOTA_URL {url!r} is not an http:// or https:// URL.") from err
    prepared.headers.update(identity.credential_header("POST", prepared.path_url, body))
    try:
        with requests.Session() as session:
            resp = session.send(prepared, timeout=(min(timeout_s, 3.0), timeout_s))
    except requests.exceptions.RequestException as err:
        raise ServiceUnavailable(
            f"`slurm-quota {command}` is not root here, so it asks the slurm-quota service at "
            f"{target}, which did not answer ({type(err).__name__}). Is slurm-quota.socket "
            "running on the controller, and is SLURM_QUOTA_URL right?"
        ) from err
    try:
        data = resp.json()
    except ValueError:
        data = None
    if resp.status_code == 200 and isinstance(data, dict) and "result" in data:
        return result_from_json(command, data["result"])
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        cls = _ERROR_CLASSES.get(str(data.get("error")))
        if cls is None:
            cls = {2: InvalidInput, 75: errors.TemporaryFailure}.get(
                data.get("exit_code"), SlurmQuotaError
            )
        raise cls(data["message"])
    if resp.status_code in (404, 405):
        raise SlurmQuotaError(
            f"The service at {target} does not take admin commands (HTTP {resp.status_code}); "
            "it may be an older slurm-quota. Run the command as root on the controller."
        )
    raise SlurmQuotaError(f"The service at {target} answered HTTP {resp.status_code}.")
