"""The round engine: one round, a peer across rounds, group state, transports, checkpoints."""
