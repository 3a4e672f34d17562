"""A group averager that lies, for tests and bench/attacks.py: it sends an adversary's forgery
(tests/attackers/adversaries.py) through the real exchange, so that honest members meet it exactly
as they would meet a modified volunteer on the network."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from swarmtune.protocols.averaging import GroupAverager, encode_contribution
from swarmtune.protocols.group import MemberMeta
from tests.attackers.adversaries import Forgery


class HostileAverager(GroupAverager):
    """Set `forgery` before an exchange; None behaves honestly."""

    forgery: Forgery | None = None
    _served: bytes | None = None

    def _commit(
        self, tensors: Mapping[str, torch.Tensor], meta: MemberMeta
    ) -> tuple[bytes, MemberMeta]:
        forged = self.forgery
        self._served = None
        if forged is None:
            return super()._commit(tensors, meta)
        meta = dataclasses.replace(
            meta, weight=forged.weight, ticket=meta.ticket if forged.ticket else ""
        )
        if forged.equivocate:  # commit to the honest delta, serve the forged one
            blob, committed = super()._commit(tensors, meta)
            self._served = encode_contribution(forged.delta, committed, self.codec)
            return blob, committed
        return super()._commit(forged.delta, meta)

    def _revealed(self, blob: bytes) -> bytes:
        return self._served if self._served is not None else blob

    def _publish(self, name: str, blob: bytes) -> None:
        if self.forgery is None or not self.forgery.withhold:
            super()._publish(name, blob)

    def _gathered(self, meta: MemberMeta) -> dict[str, Any]:
        if self.forgery is not None and self.forgery.malformed:
            return {**meta.gather(), "weight": "a lot", "sha256": None}
        return super()._gathered(meta)
