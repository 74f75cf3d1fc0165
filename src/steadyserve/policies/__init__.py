"""Pure decisions: no asyncio, sockets, clocks or global randomness; time and rng are arguments."""
