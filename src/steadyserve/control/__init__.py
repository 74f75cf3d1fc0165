"""The control plane (runs in the gateway process): supervisor, launchers, health."""
