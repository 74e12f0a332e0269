"""Benchmarks of ddpmseg against a faithful re-implementation of the official in-memory path.

Run `python benchmarks/run.py [--quick] [--json]` from the repository root; see benchmarks/run.py.
"""
