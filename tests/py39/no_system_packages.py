"""pytest plugin for the Python 3.9 tree (tests/py39/run.py loads it with -p).

Tests that need Debian packages (the real lua5.1 + LuaDBI of tests/lua, luacheck) call
tests.syspkgs.require(), which would apt-get them into the cached bullseye tree. They test the
Lua side, which the host's run covers; here they are deselected (not skipped: in CI a skip
reads as a failure to run) and the list of them is printed, so the tree stays what mmdebstrap
built and this run needs nothing from Debian's archive.
"""

from __future__ import annotations

import pytest

from tests import syspkgs


def _skip(packages: list[str]) -> None:
    pytest.skip(
        f"needs Debian packages ({' '.join(packages)}): run on the host by `make test`, "
        "not in the Python 3.9 tree"
    )


# The test files whose every test needs such packages (tests/lua/realrun.py's lua5.x + LuaDBI,
# lua-check); another test calling syspkgs.require() here is still skipped with the reason.
HOST_ONLY = ("tests/lua/test_real_lua.py", "tests/lua/test_luacheck.py")


def pytest_configure(config: pytest.Config) -> None:
    syspkgs.require = _skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    host_only = [i for i in items if i.nodeid.split("::", 1)[0] in HOST_ONLY]
    if host_only:
        items[:] = [i for i in items if i not in host_only]
        config.hook.pytest_deselected(items=host_only)
        print(f"\n[py39] {len(host_only)} tests of {', '.join(HOST_ONLY)} deselected: they need "
              "Debian's Lua packages and run on the host by `make test`")
