"""The `steadyserve` command line: one module per noun."""
