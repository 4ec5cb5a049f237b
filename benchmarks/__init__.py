"""Benchmarks of stallguard's cost; run them as modules, e.g. ``python -m benchmarks.overhead``."""
