"""How an inner phase ends early. Kept apart from trainer.py so that the round engine, which
catches these, need not import the trainer's libraries (transformers, peft) to do so."""


class RoundAbandoned(Exception):
    """The inner loop was asked to stop (Ctrl+C); the round's partial work is dropped."""


class TrainingDiverged(ValueError):
    """A loss came out NaN or infinite: the round stops before the step that would spread it
    into the adapter, its update is never sent, and the last checkpoint stays as it was."""
