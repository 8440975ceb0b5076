"""Benchmarks (python -m bench.<name>); results are recorded by device under bench/results/."""
