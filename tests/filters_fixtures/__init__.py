"""Python HTTP filters and helpers for the filter tests (tests/test_filters_*.py).

Configs name these filters as ``module: filters_fixtures.<module>``; ``tests/`` is on
``sys.path`` (pytest's rootdir conftest), and envoyx runs in-process (``envoyx.Server``),
so the proxy imports them from the same path.
"""
