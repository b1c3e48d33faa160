"""JetStream contract shared by the control plane and daemons: streams, subjects, ids."""
