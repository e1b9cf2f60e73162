"""Read commands: stats (local --db mode or HTTP) and serve.

Parse, call one library function, format. No SQL here.
"""

from __future__ import annotations
