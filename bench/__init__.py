"""Benchmarks for pgolf_kernels. `python -m bench` runs every bench/bench_*.py module."""
