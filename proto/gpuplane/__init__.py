"""gpuplane wire contract: generated protobuf and gRPC stubs live in gpuplane.v1."""
