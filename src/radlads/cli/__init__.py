"""The `radlads` command line: thin argument parsing over the library."""
