"""The test suite. A package so that its helpers import as `tests.support.<module>` under pytest (which puts the
repository root on sys.path) and from the benchmarks (which add the repository root themselves)."""
