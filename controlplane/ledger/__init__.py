"""Double-entry credit ledger in integer micro-credits."""
