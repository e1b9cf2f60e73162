"""Admin commands (root): migrate, quotas, adjust, defaults, GPU factors, history.

Parse, call one library function, format. No SQL here.
"""

from __future__ import annotations

import click

from slurm_quota.cli.base import Settings, cli, pass_settings, require_root


@cli.command("migrate")
@pass_settings
def migrate_cmd(settings: Settings) -> None:
    """Create the database or upgrade it (also a seed-system database) to the latest schema.

    \b
    Example:
      slurm-quota --db /var/lib/state/slurm-quota/slurm-quota.db migrate
    """
    require_root("migrate")
    from slurm_quota import db

    applied = db.migrate(settings.db_path)
    version = db.schema_version(settings.db_path)
    if applied:
        click.echo(f"Applied migrations {', '.join(map(str, applied))}; schema version {version}.")
    else:
        click.echo(f"Schema already at version {version}; nothing to do.")
