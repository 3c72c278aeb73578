"""Research studies and the `lens-steer` command line."""
