"""The journal of changes: who changed what, old -> new, and why, in the change's transaction.

Owns Journal, the one way to write a journal row: the actor and the reason are given once per
transaction, each change names its action, target and values. The SQL is db.py's.
"""

from __future__ import annotations

from typing import Any

from slurm_quota import db


class Journal:
    """Journal rows written on conn (inside the caller's transaction) by actor, for reason."""

    def __init__(self, conn: Any, actor: str, reason: str | None = None) -> None:
        self.conn = conn
        self.actor = actor
        self.reason = reason

    def record(
        self,
        action: str,
        target_kind: str,
        target: str,
        *,
        field: str | None = None,
        old: str | None = None,
        new: str | None = None,
        reason: str | None = None,
    ) -> int:
        """Append one row (reason: this change's own, else the journal's); return its id."""
        return db.insert_journal(
            self.conn, actor=self.actor, action=action, target_kind=target_kind,
            target=target, field=field, old_value=old, new_value=new,
            reason=reason if reason is not None else self.reason,
        )
