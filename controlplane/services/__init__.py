"""Long-running services: replicas kept at a desired count, replaced when they end."""
