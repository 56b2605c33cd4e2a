"""Kiln's benchmarks: figures measured side by side in one run and printed as ratios.

`make bench` runs them all at full size, `make bench-quick` smaller; tests run a smoke
size that proves the code works without judging any number. See bench/README.md.
"""
