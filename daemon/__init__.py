"""The provider daemon: GPUs (NVML or simulated), Docker runtime, job executor, agent."""
