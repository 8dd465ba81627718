"""The benchmark: our pool against every reference, in one run on one throwaway PostgreSQL.

``make bench`` (or ``python -m bench`` in ``.venvs/bench-psycopg3``) builds the
virtualenvs it needs (`bench/prepare`), starts a PostgreSQL cluster, runs each
reference in a process of its own (`bench.worker`) and writes
``docs/benchmarks.md`` and ``docs/benchmarks.png`` (`bench.report`).
"""
