"""The benchmark suites of the README's Results, one module per suite (``python -m earlybert_ds.bench --help``).
They drive the package from outside: no module of the package imports them, but for the ``bench`` sub-command."""
