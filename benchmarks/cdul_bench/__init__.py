"""Throughput and latency benchmarks of cdul, run by ``benchmarks/run.py``."""
