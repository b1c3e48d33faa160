"""Interactive sessions: a kind of job with a duration, extended, ended by the user."""
