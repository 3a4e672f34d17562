"""The commands: bootstrap (coordinator), join (volunteer), pull/status (consumer), demo, simulate."""
