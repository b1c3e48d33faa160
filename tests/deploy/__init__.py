"""Tests of deploy/: compose file, Dockerfiles, NATS config, env examples."""
