"""``lmgw-fleetsim``: thousands of simulated gateways in one process, on the project's real channel code."""
