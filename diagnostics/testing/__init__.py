"""Fixtures shared by the tests, the report's gold files and the benchmarks: synthetic runs."""
