"""Job lifecycle commands run by Slurm or root: charge, reconcile, prune.

Parse, call one library function, format. No SQL, no subprocess here.
"""

from __future__ import annotations
