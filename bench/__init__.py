"""Benchmarks (``fastkd bench ...`` or ``python -m fastkd.bench.<name>``); results in bench/results/."""
