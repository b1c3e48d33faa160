"""Generated stubs of proto/gpuplane/v1/*.proto (regenerate with scripts/gen-stubs)."""
