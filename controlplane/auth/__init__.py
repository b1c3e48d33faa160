"""Tenants, API keys and who may call what."""
