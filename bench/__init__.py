"""Benchmarks: commands that print figures (``make bench``). Never assertions."""
