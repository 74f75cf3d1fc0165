"""Code that runs inside a replica process: server, batcher, runner."""
