"""What the control plane and daemons share: JetStream names, TLS, signing, data-dir lock."""
