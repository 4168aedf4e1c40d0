"""Benchmarks: workloads, random-weight models of real shapes, baselines."""
