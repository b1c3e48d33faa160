"""Real local servers (NATS, S3, PostgreSQL, Docker) for tests, benchmarks and `gpuplane up`."""

from devstack.docker_engine import DockerEngine, HookCall
from devstack.images import TEST_IMAGE, build_test_image
from devstack.leftovers import Leftover, find_leftovers, stop_leftovers
from devstack.nats import NatsServer, NatsTls
from devstack.nats_cluster import NatsCluster
from devstack.ports import free_port, free_ports
from devstack.postgres import PostgresCluster
from devstack.process import DevstackError, LocalServer, ManagedProcess
from devstack.s3 import S3Server

__all__ = [
    "TEST_IMAGE",
    "DevstackError",
    "DockerEngine",
    "HookCall",
    "Leftover",
    "LocalServer",
    "ManagedProcess",
    "NatsCluster",
    "NatsServer",
    "NatsTls",
    "PostgresCluster",
    "S3Server",
    "build_test_image",
    "find_leftovers",
    "free_port",
    "free_ports",
    "stop_leftovers",
]
