"""The DSO reference server: accepts gateways, keeps a registry, relays operator calls."""
