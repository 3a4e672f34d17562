"""Pure math on tensors: outer optimizers and pseudo-gradient algebra (no I/O, no networking)."""
