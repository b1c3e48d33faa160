"""Transactional outbox: rows committed with a state change, published to JetStream after."""
