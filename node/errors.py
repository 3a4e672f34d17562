"""Errors that mean bad input, not a bug: the CLI prints them as one line."""

from node.adapters.adapter import AdapterError
from node.config import ConfigError
from node.engine.state import StateError
from node.local.basemodel import BaseModelError
from node.local.data import DataError
from node.local.trainer import TrainingDiverged
from protocols.swarm import SwarmError
from protocols.transfer import TransferError

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
