"""Helpers that tests and benchmarks share, and that users may reuse in their own tests."""
