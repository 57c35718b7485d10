"""Load managers over Modbus: profiles, transports, load shedding and the TCP->RTU bridge."""
