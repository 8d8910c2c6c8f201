"""Micro-benchmarks of the op (pytest-benchmark); a package so their module names never clash with tests/."""
