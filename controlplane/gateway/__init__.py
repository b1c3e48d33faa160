"""The services gateway's routing core: per-replica circuit breakers and replica choice."""
