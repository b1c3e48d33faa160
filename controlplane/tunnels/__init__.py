"""Tunnels: exec and port-forward bytes relayed between a client's call and its host's daemon."""
