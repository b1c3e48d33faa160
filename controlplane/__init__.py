"""gpuplane control plane: registry, scheduler, ledger and job state behind a gRPC API."""
