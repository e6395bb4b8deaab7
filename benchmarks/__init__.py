"""poet-mlx benchmarks: `python benchmarks/bench.py [--quick]` (see bench.py). Not part of the installed package."""
