"""CPython 3.9 with the library versions EL9 ships: tests/unit under them (make test-py39)."""
