"""Consumers' input data: presigned uploads into their own input area, records and hashes."""
