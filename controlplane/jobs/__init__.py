"""Jobs: spec validation, the state machine, events, attempts, results."""
