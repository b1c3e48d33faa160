"""Commands to daemons: stored, delivered by the replica holding the stream, acked."""
