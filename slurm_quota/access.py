"""Who is acting, and who may write the ledger from the automated paths (charge, reconcile).

Root, or the owner of the database file: SlurmUser, as which slurmctld runs the jobcomp
script and the reconcile timer runs. The actor is the name journaled with every change.
Stays free of click so the charge fast path can use it.
"""

from __future__ import annotations

import os
import pwd
import unicodedata

from slurm_quota.errors import NotPermitted

SUDO_USER_MAX_LEN = 128  # as long as a user name may be (validate.NAME_MAX_LEN)


def require_ledger_writer(db_path: object, command: str) -> None:
    """Refuse unless the real uid is root or owns db_path (a missing file is left to open).

    db_path may be a config.SQLiteLedger, or a config.MariaDBLedger: then whoever could read
    its credentials (the configuration file, mode 0600, SlurmUser's) may write.
    """
    kind = getattr(db_path, "kind", None)
    if kind == "mariadb":
        return
    if kind == "sqlite":
        db_path = db_path.path  # type: ignore[attr-defined]
    uid = os.getuid()
    if uid == 0:
        return
    try:
        owner = os.stat(db_path).st_uid
    except OSError:
        return  # a missing file: opening it reports that more clearly
    if owner != uid:
        raise NotPermitted(
            f"`slurm-quota {command}` writes the ledger and runs as root or as the owner of "
            f"{db_path} (SlurmUser); you are uid {uid}. Nothing was changed."
        )


def current_actor() -> str:
    """Who is acting: the real uid's user name, plus the sudo user when SUDO_USER is set."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid {uid}"
    sudo_user = "".join(
        ch for ch in os.environ.get("SUDO_USER", "") if not unicodedata.category(ch)[0] == "C"
    )[:SUDO_USER_MAX_LEN]
    if sudo_user and sudo_user != name:
        return f"{name} (sudo {sudo_user})"
    return name
