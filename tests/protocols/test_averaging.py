"""GroupAverager side effects on the hosting process (real DHT on 127.0.0.1)."""

import signal

import torch
from hivemind.dht import DHT

from protocols.averaging import GroupAverager


def test_opening_an_averager_keeps_our_signal_handlers() -> None:
    # hivemind sets SIGINT to SIG_IGN while starting its averager process and never restores it;
    # a volunteer that moves to a cluster mid-run would then ignore Ctrl+C.
    def handler(signum: int, frame: object) -> None:
        return None

    previous = signal.signal(signal.SIGINT, handler)
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        averager = GroupAverager(dht, "sigtest_global", {"w": torch.zeros(3)})
        again = GroupAverager(dht, "sigtest_cluster0", {"w": torch.zeros(3)})
        assert signal.getsignal(signal.SIGINT) is handler
        averager.shutdown()
        again.shutdown()
    finally:
        dht.shutdown()
        signal.signal(signal.SIGINT, previous)
