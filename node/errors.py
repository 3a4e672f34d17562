"""Errors that mean bad input, not a bug: the CLI prints them as one line."""

from swarmtune.node.adapters.adapter import AdapterError
from swarmtune.node.config import ConfigError
from swarmtune.node.engine.state import StateError
from swarmtune.node.local.basemodel import BaseModelError
from swarmtune.node.local.data import DataError
from swarmtune.node.local.errors import TrainingDiverged
from swarmtune.protocols.swarm import SwarmError
from swarmtune.protocols.transfer import TransferError

USER_ERRORS: tuple[type[Exception], ...] = (
    AdapterError,
    BaseModelError,
    ConfigError,
    DataError,
    StateError,
    SwarmError,
    TrainingDiverged,
    TransferError,
)
