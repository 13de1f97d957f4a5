"""What backends exist and which version each serves: the registry, discovery, the
control plane and the rollout controller."""
