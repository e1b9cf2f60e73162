"""mod_wsgi script file of the dashboard: `WSGIScriptAlias / <this file>`.

Find its path with: python3 -c 'import slurm_quota.web.wsgi as m; print(m.__file__)'
"""

from slurm_quota.app import application  # noqa: F401  (mod_wsgi looks up `application`)
