"""The bundle: the egress proxy sidecar, a bottle's only way out."""
