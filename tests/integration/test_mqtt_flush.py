"""The fleet tool's flush: it waits as long as acknowledgements keep coming, and never returns unacknowledged."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edgefleet.errors import TransportError
from edgefleet.mqtt import PUBLISH_WINDOW, Outgoing, connect
from edgefleet.testing.broker import MosquittoBroker
from edgefleet.testing.waiting import wait_for

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


def test_a_wave_of_20000_commands_is_paced_within_the_brokers_receive_maximum_and_all_arrive_in_order(tmp_path: Path) -> None:
    # paho walks every message it holds on each PUBACK, and MQTT 5 forbids exceeding the broker's
    # Receive Maximum: publish_all hands paho min(PUBLISH_WINDOW, Receive Maximum) at a time
    with MosquittoBroker(tmp_path) as broker:
        got: list[int] = []
        listener = connect(broker.url, client_id="wave-listener",
                           on_message=lambda m: got.append(int(m.payload)))
        listener.subscribe(["edgefleet/v1/devices/+/cmd/update"])
        sender = connect(broker.url, client_id="wave-sender")
        try:
            held: list[int] = []
            original = sender._link.send

            def counting_send(*args: Any, **kwargs: Any) -> Any:
                held.append(len(sender._link._client._out_messages))
                return original(*args, **kwargs)

            sender._link.send = counting_send  # type: ignore[method-assign]
            n = sender.publish_all((Outgoing(f"edgefleet/v1/devices/d{i}/cmd/update", str(i).encode())
                                    for i in range(20_000)), stall_s=10)
            assert n == 20_000
            limit = sender._link.receive_maximum  # Mosquitto says 20 in its CONNACK
            assert limit is not None and max(held) <= min(PUBLISH_WINDOW, limit)
            wait_for(lambda: len(got) == 20_000, 30, what="every command delivered")
            assert got == list(range(20_000))
        finally:
            sender.close()
            listener.close()
