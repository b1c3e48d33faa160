"""Commands to daemons (cancel, drain): stored, delivered by whichever replica holds the
host's Connect stream, re-sent until the daemon acknowledges them."""
