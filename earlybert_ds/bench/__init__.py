"""The benchmark suites behind docs/results.md, one module per suite (``python -m earlybert_ds.bench --help``).
They drive the package from outside: no module of the package imports them, but for the ``bench`` sub-command."""
