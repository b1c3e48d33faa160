"""Provider registry: registration tokens, hosts, GPUs, liveness, offers."""
