"""Errors that mean bad input, not a bug: the CLI prints them as one line."""

from node.adapter import AdapterError
from node.basemodel import BaseModelError
from node.config import ConfigError
from node.data import DataError
from node.state import StateError
from protocols.swarm import SwarmError
from protocols.transfer import TransferError

USER_ERRORS: tuple[type[Exception], ...] = (
    AdapterError,
    BaseModelError,
    ConfigError,
    DataError,
    StateError,
    SwarmError,
    TransferError,
)
