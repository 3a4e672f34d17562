"""PEFT adapter directories: writing them, reading and merging them, choosing offers."""
