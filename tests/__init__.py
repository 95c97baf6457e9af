"""The test suite (a package, so that tests/ and tests/experiments/ may hold files of the same name)."""
