"""pytest plugin for the Python 3.9 tree (tests/py39/run.py loads it with -p).

Tests that need Debian packages (the real lua5.1 + LuaDBI of tests/lua, luacheck) call
tests.syspkgs.require(), which would apt-get them into the cached bullseye tree. They test the
Lua side, which the host's run covers; here they are skipped with that reason instead, so the
tree stays what mmdebstrap built and this run needs nothing from Debian's archive.
"""

from __future__ import annotations

import pytest

from tests import syspkgs


def _skip(packages: list[str]) -> None:
    pytest.skip(
        f"needs Debian packages ({' '.join(packages)}): run on the host by `make test`, "
        "not in the Python 3.9 tree"
    )


def pytest_configure(config: pytest.Config) -> None:
    syspkgs.require = _skip
