"""Who may write the ledger from the automated paths (charge, reconcile).

Root, or the owner of the database file: SlurmUser, as which slurmctld runs the jobcomp
script and the reconcile timer runs. Stays free of click so the charge fast path can use it.
"""

from __future__ import annotations

import os

from slurm_quota.errors import NotPermitted


def require_ledger_writer(db_path: str, command: str) -> None:
    """Refuse unless the real uid is root or owns db_path (a missing file is left to open)."""
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
