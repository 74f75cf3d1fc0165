"""Code that runs in the gateway process's data plane: admission, routes, dispatch."""
