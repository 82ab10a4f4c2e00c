"""Runnable tools built on the package (demo, benchmarks, checkpoint converters); never imported by it."""
