"""What an identity may see and do, as Slurm says: roles from the accounting database and
privacy from slurm.conf's PrivateData. Nothing is configured in slurm-quota itself.

Roles (the sacctmgr command that grants each is in docs/operating.md):
  admin        root, the SlurmUser, or AdminLevel=Administrator
  operator     AdminLevel=Operator
  coordinator  a coordinator of one or more accounts (sacctmgr add coordinator)
  user         everyone else with a name; anonymous: a request without an identity

Privacy: when PrivateData holds `usage`, `users` or `accounts`, a user sees only their own
row and the accounts they have an association with; a coordinator also the accounts they
coordinate and the users of those accounts; operators and admins everything. Otherwise
everyone sees everything (the seed system's behaviour).

Owns: the Slurm view (one `scontrol show config` and three sacctmgr queries, kept for a
short time), the Access of an identity and the filtering of a /stats payload. The Slurm
commands are slurm.py's. Must not read the ledger.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slurm_quota import slurm
from slurm_quota.errors import NotAuthenticated, NotPermitted, SlurmQuotaError, SlurmUnavailable
from slurm_quota.identity import Identity

log = logging.getLogger(__name__)

ADMIN = "admin"
OPERATOR = "operator"
COORDINATOR = "coordinator"
USER = "user"
ANONYMOUS = "anonymous"
WRITERS = (ADMIN, OPERATOR)
# PrivateData flags that hide one user's quota usage from another (slurm.conf(5)).
PRIVATE_FLAGS = frozenset({"usage", "users", "accounts"})
DEFAULT_TTL_S = 60.0
RETRY_S = 10.0  # after Slurm failed to answer, keep the last view this long before asking


@dataclass(frozen=True)
class SlurmView:
    """What Slurm says about who is who, at one moment."""

    slurm_user: str
    private_data: frozenset[str]
    admin_levels: dict[str, str] = field(default_factory=dict)
    coordinators: dict[str, frozenset[str]] = field(default_factory=dict)  # account -> users
    associations: dict[str, frozenset[str]] = field(default_factory=dict)  # user -> accounts

    @property
    def private(self) -> bool:
        """True when PrivateData hides one user's usage from another."""
        return bool(self.private_data & PRIVATE_FLAGS)

    @property
    def private_flags(self) -> str:
        """The PrivateData flags that apply here, for messages (`usage,users`)."""
        return ",".join(sorted(self.private_data & PRIVATE_FLAGS))


@dataclass(frozen=True)
class Access:
    """What one identity may see and do."""

    name: str | None
    role: str
    private: bool
    flags: str = ""
    own_accounts: frozenset[str] = frozenset()
    coordinated: frozenset[str] = frozenset()
    users_of_coordinated: frozenset[str] = frozenset()

    @property
    def sees_everything(self) -> bool:
        return not self.private or self.role in WRITERS

    @property
    def may_write(self) -> bool:
        return self.role in WRITERS

    def may_see_user(self, username: str) -> bool:
        return (
            self.sees_everything or username == self.name or (username in self.users_of_coordinated)
        )

    def may_see_account(self, account: str) -> bool:
        return self.sees_everything or account in self.own_accounts or account in self.coordinated

    def describe(self) -> str:
        """Who this is, for messages: `alice (user)`."""
        return "an anonymous request" if self.name is None else f"{self.name} ({self.role})"


def parse_private_data(value: str) -> frozenset[str]:
    """The flags of a PrivateData value as `scontrol show config` prints it."""
    flags = {f.strip().lower() for f in value.replace(" ", ",").split(",")}
    return frozenset(f for f in flags if f and f != "none")


def _user_name(slurm_user: str) -> str:
    # scontrol prints `SlurmUser = slurm(64030)`.
    return slurm_user.split("(", 1)[0].strip()


def load_view(runner: slurm.Runner | None = None) -> SlurmView:
    """Ask Slurm now (SlurmUnavailable when it does not answer)."""
    config = slurm.slurm_config(runner=runner)
    return SlurmView(
        slurm_user=_user_name(config.get("SlurmUser", "")),
        private_data=parse_private_data(config.get("PrivateData", "")),
        admin_levels=slurm.admin_levels(runner=runner),
        coordinators=slurm.account_coordinators(runner=runner),
        associations=slurm.user_accounts(runner=runner),
    )


def access_of(identity: Identity, view: SlurmView) -> Access:
    """The Access of identity under view."""
    private, flags = view.private, view.private_flags
    if identity.name is None:
        return Access(name=None, role=ANONYMOUS, private=private, flags=flags)
    name = identity.name
    level = view.admin_levels.get(name, "").lower()
    if identity.uid == 0 or name == view.slurm_user or level == "administrator":
        role = ADMIN
    elif level == "operator":
        role = OPERATOR
    else:
        role = USER
    coordinated = frozenset(a for a, users in view.coordinators.items() if name in users)
    if role == USER and coordinated:
        role = COORDINATOR
    members = frozenset(
        user for user, accounts in view.associations.items() if accounts & coordinated
    )
    return Access(
        name=name,
        role=role,
        private=private,
        flags=flags,
        own_accounts=view.associations.get(name, frozenset()),
        coordinated=coordinated,
        users_of_coordinated=members,
    )


class Roles:
    """The Slurm view, asked again at most every ttl_s seconds (shared by threads)."""

    def __init__(
        self,
        ttl_s: float = DEFAULT_TTL_S,
        *,
        load: Callable[[], SlurmView] = load_view,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self._load = load
        self._clock = clock
        self._lock = threading.Lock()
        self._view: tuple[float, SlurmView] | None = None
        self._retry_at = float("-inf")

    def view(self) -> SlurmView:
        """The current view. When Slurm does not answer, the last view is kept (logged) for
        up to ten times ttl_s; with none, SlurmUnavailable."""
        with self._lock:
            now = self._clock()
            stale = self._view is None or now - self._view[0] >= self.ttl_s
            if stale and now >= self._retry_at:
                try:
                    self._view = (now, self._load())
                    return self._view[1]
                except SlurmQuotaError as err:
                    if self._view is None or now - self._view[0] >= 10 * self.ttl_s:
                        raise
                    # Not again for every request: each try may wait for sacctmgr's timeout.
                    self._retry_at = now + min(self.ttl_s, RETRY_S)
                    log.warning(
                        "roles: Slurm did not answer (%s); using the view of %.0f s ago",
                        err,
                        now - self._view[0],
                    )
            if self._view is None or now - self._view[0] >= 10 * self.ttl_s:
                raise SlurmUnavailable("Slurm has not said who is who for too long.")
            return self._view[1]

    def access(self, identity: Identity) -> Access:
        """What identity may see and do now."""
        return access_of(identity, self.view())


def filter_payload(payload: dict[str, Any], access: Access) -> dict[str, Any]:
    """A /stats payload with only the rows access may see (the same object when all)."""
    if access.sees_everything:
        return payload
    return {
        **payload,
        "users": [r for r in payload.get("users", []) if access.may_see_user(r["username"])],
        "accounts": [
            r for r in payload.get("accounts", []) if access.may_see_account(r["account"])
        ],
    }


def _needs_identity(access: Access, what: str) -> NotAuthenticated:
    return NotAuthenticated(
        f"PrivateData={access.flags} in slurm.conf: {what} is shown only to whoever it "
        "belongs to, so the service must know who asks. `slurm-quota stats` sends a MUNGE "
        "credential (is munged running on this host?); a web front end must set REMOTE_USER "
        "(serve --trust-remote-user)."
    )


def check_stats(access: Access, username: str | None, account: str | None) -> None:
    """NotAuthenticated / NotPermitted when access may not ask /stats for this selector."""
    if access.sees_everything:
        return
    if access.name is None:
        raise _needs_identity(access, "usage")
    rule = (
        f"PrivateData={access.flags} in slurm.conf: {access.describe()} may see their own "
        "usage and their accounts'"
        + (" and the users of the accounts they coordinate" if access.coordinated else "")
    )
    if username is not None and not access.may_see_user(username):
        raise NotPermitted(f"{rule}, not user {username}'s.")
    if account is not None and not access.may_see_account(account):
        raise NotPermitted(f"{rule}, not account {account}'s.")


def check_metrics(access: Access) -> None:
    """NotAuthenticated / NotPermitted when access may not read /metrics (every user's
    usage) under PrivateData."""
    if access.sees_everything:
        return
    if access.name is None:
        raise _needs_identity(access, "/metrics (every user's usage)")
    raise NotPermitted(
        f"PrivateData={access.flags} in slurm.conf: /metrics shows every user's usage and is "
        f"for Slurm operators and administrators; you are {access.describe()}."
    )
