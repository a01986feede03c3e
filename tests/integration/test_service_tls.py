"""mqtts: the agent verifies the broker against its CA and can present a client certificate."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgefleet.testing.broker import MosquittoBroker, free_port
from edgefleet.testing.pki import write_ca, write_leaf
from edgefleet.testing.waiting import wait_for
from edgefleet.topics import all_devices
from tests.integration.service_support import AgentProcess, Observer, agent_config, broker_files_access


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory):
    pki = tmp_path_factory.mktemp("pki")
    ca = write_ca(pki, "ca")
    write_ca(pki, "other-ca")
    write_leaf(pki, "broker", ca, server=True)
    write_leaf(pki, "pi-tls", ca, server=False)
    tls_port = free_port()
    extra = broker_files_access() + (
        f"listener {tls_port} 127.0.0.1\ncafile {pki}/ca.pem\ncertfile {pki}/broker.pem\n"
        f"keyfile {pki}/broker.key\nrequire_certificate true\n")
    with MosquittoBroker(tmp_path_factory.mktemp("tls-broker"), extra_config=extra) as broker:
        yield broker, tls_port, pki


def test_agent_connects_over_mutual_tls_and_refuses_a_broker_it_cannot_verify(tls_broker, tmp_path: Path) -> None:
    broker, tls_port, pki = tls_broker
    obs = Observer(broker.port, topic=all_devices("state"))  # the plain loopback listener
    url = f"mqtts://127.0.0.1:{tls_port}"
    good = AgentProcess(tmp_path / "good", agent_config(
        tmp_path / "good", url, device_id="pi-tls",
        broker={"ca_file": str(pki / "ca.pem"), "cert_file": str(pki / "pi-tls.pem"),
                "key_file": str(pki / "pi-tls.key")})).start()
    wrong_ca = AgentProcess(tmp_path / "bad", agent_config(
        tmp_path / "bad", url, device_id="pi-badca",
        broker={"ca_file": str(pki / "other-ca.pem"), "cert_file": str(pki / "pi-tls.pem"),
                "key_file": str(pki / "pi-tls.key")})).start()
    try:
        wait_for(lambda: [b for b in obs.on("pi-tls/state") if b["online"]], 20, what="birth over TLS")
        time.sleep(1.0)
        assert not obs.on("pi-badca/state"), "connected to a broker whose certificate it cannot verify"
        assert wrong_ca.proc.poll() is None  # it keeps retrying instead of crashing
        assert good.terminate() == 0
    finally:
        good.stop_quietly()
        wrong_ca.stop_quietly()
        obs.close()
