"""poet-mlx command line: thin commands over the library. Only this package draws UI."""
