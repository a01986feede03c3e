"""mqtts: the agent verifies the broker against its CA and can present a client certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.testing.broker import MosquittoBroker, free_port
from edgefleet.testing.waiting import wait_for
from edgefleet.topics import all_devices
from tests.integration.service_support import AgentProcess, Observer, agent_config, broker_files_access


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _ca(directory: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _leaf(directory: Path, name: str, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
          server: bool) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca[1].subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.ExtendedKeyUsage(
                   [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(ca[0], hashes.SHA256())
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, directory / f"{name}.key")


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory):
    pki = tmp_path_factory.mktemp("pki")
    ca = _ca(pki, "ca")
    _ca(pki, "other-ca")
    _leaf(pki, "broker", ca, server=True)
    _leaf(pki, "pi-tls", ca, server=False)
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
