"""Benchmarks that print figures and ratios (run as modules: ``python -m bench.forward``)."""
