"""The benchmark of issue 3 (scripts/bench.py), one module per part of the run."""
