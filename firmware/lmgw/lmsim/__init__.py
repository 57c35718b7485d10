"""LM simulator: a pymodbus server that behaves like a load manager, with fault injection."""
