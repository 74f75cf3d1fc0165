"""API keys: the token format, the key records, the in-memory key ring gateways check
requests against (`keyring`), and the exposure rule for non-loopback listeners."""
