"""The fleet tool's flush: it waits as long as acknowledgements keep coming, and never returns unacknowledged."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from edgefleet.errors import TransportError
from edgefleet.mqtt import connect
from edgefleet.testing.broker import MosquittoBroker

pytestmark = pytest.mark.timeout(60)


def test_a_frozen_broker_makes_flush_fail_after_the_stall_not_return_silently(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path) as broker:
        client = connect(broker.url, client_id="flush-frozen")
        try:
            assert broker.proc is not None
            os.kill(broker.proc.pid, signal.SIGSTOP)  # alive, connected, answers nothing
            try:
                infos = [client.publish("edgefleet/v1/devices/d1/cmd/x", {"n": i}) for i in range(3)]
                t0 = time.monotonic()
                with pytest.raises(TransportError, match="no acknowledgement for 1s"):
                    client.flush(infos, stall_s=1.0)
                assert time.monotonic() - t0 < 5
            finally:
                os.kill(broker.proc.pid, signal.SIGCONT)
        finally:
            client.close()


def test_a_broker_that_pauses_often_is_waited_for_past_the_stall_limit(tmp_path: Path) -> None:
    # a replicated broker acknowledges a large wave at its own pace: three 0.4 s pauses
    # (each shorter than the 0.8 s stall limit, together longer) must not fail the flush
    with MosquittoBroker(tmp_path) as broker:
        client = connect(broker.url, client_id="flush-paused")
        assert broker.proc is not None
        pid = broker.proc.pid

        def pause_three_times() -> None:
            for _ in range(3):
                os.kill(pid, signal.SIGSTOP)
                time.sleep(0.4)
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.05)

        try:
            pauses = threading.Thread(target=pause_three_times)
            t0 = time.monotonic()
            pauses.start()
            infos = []
            while pauses.is_alive():
                infos.append(client.publish("edgefleet/v1/devices/d1/cmd/x", {"n": len(infos)}))
                time.sleep(0.002)
            client.flush(infos, stall_s=0.8)
            took = time.monotonic() - t0
        finally:
            os.kill(pid, signal.SIGCONT)
            client.close()
    assert all(i.is_published() for i in infos)
    assert took > 0.8  # longer than the stall limit in total, and still acknowledged
