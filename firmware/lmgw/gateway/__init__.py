"""The gateway agent: what runs on the device."""
