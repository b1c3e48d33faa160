"""Hardware verification: a host is sold as verified only after its GPUs pass a probe."""
