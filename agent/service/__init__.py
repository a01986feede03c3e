"""``edge-agent run``: the device service (model host, OTA, MQTT, outbox, telemetry, HTTP, sources).

One module per job: :mod:`~agent.service.core` (``AgentService``: wiring, lifecycle, the
inference entry point, the emit and command queues), :mod:`~agent.service.handlers` (the
commands), :mod:`~agent.service.reporting` (state, telemetry, ``/metrics``, all from one
``Metrics``), :mod:`~agent.service.systemd` (readiness, watchdog), :mod:`~agent.service.statefiles`
(boot counter, secrets).

Threads (none of them ever blocks an inference)::

    inference callers (HTTP handlers, directory source)  -> host.infer + Metrics.record (append only)
    telemetry        every interval: window stats + system stats -> emit queue
    emit-writer      emit queue -> outbox (SQLite, fsync)          -> wakes the forwarder
    outbox-forwarder outbox -> paho (QoS 1), deletes on PUBACK, rate limited
    paho loop        network I/O, birth on connect, commands -> command queue
    commands         CommandProcessor (dedup, TTL, rate) -> handlers -> reply
    OTA worker       (agent.ota) reports through emit_event; on_serving_changed republishes the state

Shutdown (SIGTERM/SIGINT): stop inputs, take a last telemetry window, flush the outbox for a
few seconds, publish the retained offline state, disconnect, close the model and the database.
systemd: READY=1 once serving, WATCHDOG=1 from the main loop only on evidence of inference progress.
"""

from __future__ import annotations

from agent.service.core import AgentService, cmd_run
from agent.service.systemd import sd_notify

__all__ = ["AgentService", "cmd_run", "sd_notify"]
