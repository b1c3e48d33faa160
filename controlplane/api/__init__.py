"""gRPC servicers: thin translations between protobuf messages and domain services."""
