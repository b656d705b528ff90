"""Benchmarks (not part of the test run): they print ratios against physical limits and peers."""
