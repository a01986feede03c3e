"""``edge-fleet``: the operator's tool for a fleet of edgefleet devices.

Subcommands: keygen, devices, deploy, status, rollback, watch, export, simulate, serve,
exporter, migrate. Every failure is one ``error:`` line and a non-zero exit (via
:func:`edgefleet.cli.run_main`); a rollout that aborts or fails exits 1.

Without ``--controller``, ``deploy`` drives the rollout to its end in this process (``--wait``
adds live progress lines) and a killed deploy is continued with ``deploy --resume ROLLOUT_ID``.
With ``--controller URL`` deploy/rollback submit to ``edge-fleet serve`` and return at once
(``--wait`` follows the outcome); status and watch read from it.

Secrets never travel in arguments a ``ps`` shows or in the store: the broker password comes from
``--password-file`` or ``$EDGEFLEET_BROKER_PASSWORD`` (a URL holding one is refused), a signing
key's passphrase from ``--sign-key-passphrase-file`` or a terminal prompt. ``--json`` is accepted
by every command: the result as JSON on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgefleet.cli import add_common_options, run_main
from edgefleet.errors import ConfigError, ExitCode
from edgefleet.messages import AGENT_UPGRADE_HINT, ExecState, RolloutState

__all__ = ["build_parser", "main"]

EXIT_ROLLOUT_FAILED = int(ExitCode.FAILED)
LIST_MAX = 20  # devices listed by name in a final summary
STALE_S = 10.0  # a running rollout saves its state every tick (0.2 s); older than this, nobody drives it


def _read_secret(path: str, what: str) -> str:
    """The first line of a secret file (a password, a passphrase), without its newline.

    Raises:
        ConfigError: the file cannot be read or its first line is empty.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            secret = fh.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path}: cannot be read ({exc.__class__.__name__}: {exc})") from exc
    if not secret:
        raise ConfigError(f"{what} {path}: the first line is empty")
    return secret


def _broker(args: argparse.Namespace, fallback: str | None = None) -> Any:
    """The broker to connect to, as an :class:`edgefleet.mqtt.BrokerAccess`.

    The password comes from ``--password-file`` or ``$EDGEFLEET_BROKER_PASSWORD``, never the URL:
    a URL shows in ``ps`` and would be kept in the store. ``fallback`` is a stored rollout's URL.

    Raises:
        ConfigError: no broker, a password in the URL, a password without a user name, or TLS
            files for a broker that is not mqtts://.
    """
    from urllib.parse import urlsplit

    from edgefleet.mqtt import BrokerAccess, parse_broker_urls
    from fleet.store import public_broker_url

    given = args.broker or os.environ.get("EDGEFLEET_BROKER")
    url = given or public_broker_url(fallback)
    if not url:
        raise ConfigError("no broker: pass --broker mqtt://host:port (or set EDGEFLEET_BROKER)")
    if given and any(urlsplit(u.strip()).password is not None for u in given.split(",")):
        raise ConfigError(f"broker URL {public_broker_url(given)}: remove the password from it (it shows in `ps` "
                          "and would be stored); pass --password-file FILE or set EDGEFLEET_BROKER_PASSWORD")
    urls = parse_broker_urls(url)
    password_file = getattr(args, "password_file", None)
    password = (_read_secret(password_file, "--password-file") if password_file
                else os.environ.get("EDGEFLEET_BROKER_PASSWORD") or None)
    if password is not None and not all(u.username for u in urls):
        raise ConfigError(f"broker URL {url}: a password needs a user name: mqtt://USER@host")
    ca_file = getattr(args, "ca_file", None) or os.environ.get("EDGEFLEET_CA")
    cert, key = getattr(args, "cert", None), getattr(args, "key", None)
    if (getattr(args, "ca_file", None) or cert or key) and not all(u.tls for u in urls):
        raise ConfigError(f"broker URL {url}: --ca-file, --cert and --key are for an mqtts:// broker")
    if key and not cert:
        raise ConfigError("--key needs --cert: the client certificate it belongs to")
    return BrokerAccess(url, password=password, ca_file=ca_file, cert_file=cert, key_file=key)


def _controller(p: argparse.ArgumentParser, ca: bool = True) -> None:
    """``ca=False``: the command's broker options already gave ``--ca-file`` (one CA for either server)."""
    p.add_argument("--controller", metavar="URL", default=os.environ.get("EDGEFLEET_CONTROLLER"),
                   help="submit to / read from `edge-fleet serve` at this URL (env EDGEFLEET_CONTROLLER)")
    p.add_argument("--token-file", help="the controller's API token (env EDGEFLEET_TOKEN_FILE)")
    if ca:
        p.add_argument("--ca-file", help="CA bundle for an https:// controller (env EDGEFLEET_CA)")


def _state(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", metavar="URL", help="sqlite:///PATH or postgresql://... (env EDGEFLEET_STATE; "
                                                  "default: fleet.db in the data dir)")


def _open_state(args: argparse.Namespace) -> Any:
    from fleet.store import open_store, state_url

    return open_store(state_url(getattr(args, "state", None), getattr(args, "data_dir", None)))


def _targets(parser: argparse.ArgumentParser) -> None:
    sel = parser.add_mutually_exclusive_group()
    sel.add_argument("--device", nargs="+", action="extend", metavar="ID", help="device id(s)")
    sel.add_argument("--group", help="every device whose state names this group")
    sel.add_argument("--all", action="store_true", help="every device with a retained state")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-fleet", description=__doc__.splitlines()[0])
    add_common_options(parser, exit_codes={ExitCode.FAILED: "the rollout (deploy, rollback --wait) aborted or failed"})
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        add_common_options(p, subcommand=True)
        p.add_argument("--json", action="store_true",
                       help="the result as JSON on stdout (progress and notices go to stderr)")
        return p

    def broker(p: argparse.ArgumentParser) -> None:
        p.add_argument("--broker", help="mqtt://[user@]host[:port] or mqtts://..., several with commas "
                                        "(env EDGEFLEET_BROKER); never a password in it")
        p.add_argument("--password-file", help="the broker password: first line of this file "
                                               "(or env EDGEFLEET_BROKER_PASSWORD)")
        p.add_argument("--ca-file", help="CA bundle that signs the mqtts:// broker (with --controller: the "
                                         "https:// controller) instead of the system CAs (env EDGEFLEET_CA)")
        p.add_argument("--cert", help="client certificate (PEM) for a broker that requires mutual TLS")
        p.add_argument("--key", help="the client certificate's private key (PEM; default: in --cert)")

    def passphrase(p: argparse.ArgumentParser) -> None:
        p.add_argument("--sign-key-passphrase-file", metavar="FILE",
                       help="passphrase of an encrypted --sign-key (default: asked on a terminal)")

    def data_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", help="where rollouts are kept (env EDGEFLEET_DATA, "
                                          "default ~/.local/share/edgefleet)")

    p = add("keygen", "create an Ed25519 signing key pair (signing.key, signing.pub)")
    p.add_argument("--out", required=True, help="directory for the key files")
    p.add_argument("--passphrase-file", metavar="FILE", help="encrypt signing.key with the first line of FILE")

    p = add("devices", "list every device from the retained states")
    broker(p)
    p.add_argument("--settle", type=float, default=0.4, help="seconds without a new retained state before done")
    p.add_argument("--listen", type=float, default=0.0,
                   help="also listen this many seconds for telemetry (telemetry is not retained)")

    p = add("deploy", "staged rollout of an artifact: canary, growing waves, abort and roll back")
    p.add_argument("artifact", nargs="?", help="artifact directory (model.tflite + manifest.json)")
    broker(p)
    _targets(p)
    p.add_argument("--sign-key", help="sign (or re-sign) the manifest with this Ed25519 key")
    passphrase(p)
    p.add_argument("--canary", default="1", help="devices in the canary batch: N or N%% (default 1)")
    p.add_argument("--wave-base", type=int, default=5, help="devices in the first wave after the canary")
    p.add_argument("--wave-factor", type=float, default=2.0, help="growth of each later wave")
    p.add_argument("--max-failure-pct", type=float, default=10.0, help="abort above this failure share")
    p.add_argument("--min-executed", type=int, default=5, help="finished devices before the share counts")
    p.add_argument("--device-timeout", type=float, default=300.0, help="seconds for one device to finish")
    p.add_argument("--artifact-url", help="base URL of an existing HTTP/S3 server holding model.tflite")
    p.add_argument("--serve", default="0.0.0.0:0", help="HOST:PORT for the built-in artifact server")
    p.add_argument("--advertise", help="host name devices use to reach the built-in server")
    p.add_argument("--wait", action="store_true", help="show live progress")
    p.add_argument("--no-rollback-on-abort", action="store_true")
    p.add_argument("--force", action="store_true", help="deploy deployable: false artifacts; resend to "
                                                         "devices already on the version")
    p.add_argument("--resume", metavar="ROLLOUT_ID", help="continue a rollout whose fleet tool was stopped")
    data_dir(p)
    _state(p)
    _controller(p, ca=False)

    p = add("status", "rollouts and per-device execution states (from the data dir)")
    p.add_argument("rollout_id", nargs="?")
    p.add_argument("--device", metavar="ID", help="with ROLLOUT_ID: that device's history in the rollout")
    data_dir(p)
    _state(p)
    _controller(p)

    p = add("rollback", "roll devices back to their previous (or a given) version")
    broker(p)
    _targets(p)
    p.add_argument("--to", help="version to go back to (default: the previous one)")
    p.add_argument("--sign-key", help="Ed25519 key that signs the rollback statements devices need to go "
                                      "below their anti-downgrade floor (needs --to)")
    passphrase(p)
    p.add_argument("--wait", action="store_true", help="wait for every device's answer")
    p.add_argument("--device-timeout", type=float, default=120.0)
    p.add_argument("--force", action="store_true", help="cancel a running rollout on these devices")
    data_dir(p)
    _state(p)
    _controller(p, ca=False)

    p = add("watch", "live table of devices and fleet totals")
    broker(p)
    p.add_argument("--group")
    p.add_argument("--frames", type=int, help="print this many frames and exit")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between frames")
    _controller(p, ca=False)

    p = add("serve", "the rollout controller: owns rollouts, serves the API and the fleet metrics")
    broker(p)
    _state(p)
    data_dir(p)
    p.add_argument("--listen", default="127.0.0.1:8470", help="HOST:PORT of the API")
    p.add_argument("--token-file", required=True, help="file whose first line is the API token")
    p.add_argument("--tls-cert", help="serve the API over TLS with this certificate (PEM)")
    p.add_argument("--tls-key", help="... and this key (PEM)")
    p.add_argument("--serve", default="0.0.0.0:0", help="HOST:PORT of the artifact server for uploaded models")
    p.add_argument("--advertise", help="host name devices use to reach the artifact server")
    p.add_argument("--metrics", default="0.0.0.0:9479", help="HOST:PORT of /metrics, or 'off'")
    p.add_argument("--metrics-refresh", type=float, default=5.0, help="seconds between metric renders")
    p.add_argument("--stale", type=float, default=600.0, help="seconds before a silent device leaves the metrics")
    p.add_argument("--sign-key", help="Ed25519 key that signs the rollback statements of the rollouts this "
                                      "controller drives (operator rollbacks with a version, aborted deploys)")
    passphrase(p)

    p = add("exporter", "fleet metrics for Prometheus from the devices' MQTT state and telemetry")
    broker(p)
    p.add_argument("--listen", default="0.0.0.0:9479", help="HOST:PORT of /metrics")
    p.add_argument("--state", metavar="URL", help="also export rollout progress from this store")
    p.add_argument("--refresh", type=float, default=5.0, help="seconds between metric renders")
    p.add_argument("--stale", type=float, default=600.0, help="seconds before a silent device leaves the metrics")

    p = add("migrate", "bring a state database's schema up to date (run once per release)")
    _state(p)
    data_dir(p)

    p = add("export", "record device messages to .jsonl or .csv")
    broker(p)
    p.add_argument("--out", required=True, help="FILE.jsonl or FILE.csv")
    p.add_argument("--duration", type=float, default=10.0, help="seconds to record")

    p = add("simulate", "run simulated devices (for demos and benchmarks)")
    from edgefleet.testing.simulator import add_arguments

    add_arguments(p)
    return parser


# -- subcommands ----------------------------------------------------------------------------

def cmd_keygen(args: argparse.Namespace) -> int:
    from edgefleet.signing import generate_keypair

    secret = _read_secret(args.passphrase_file, "--passphrase-file") if args.passphrase_file else None
    key, pub = generate_keypair(Path(args.out), passphrase=secret.encode("utf-8") if secret else None)
    if args.json:
        print(json.dumps({"private_key": str(key), "public_key": str(pub), "encrypted": secret is not None}))
        return 0
    print(f"wrote {key} (keep it secret{', encrypted' if secret else ''}) and {pub} "
          "(install on devices as a trusted key)")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from fleet.registry import collect

    registry = collect(_broker(args), settle_s=args.settle, telemetry=args.listen > 0, listen_s=args.listen)
    devices = registry.known()
    if args.json:
        print(json.dumps([d.to_json() for d in devices], indent=2))
        return 0
    now = time.time()
    header = ("DEVICE", "ONLINE", "GROUP", "PROFILE", "MODEL", "AGENT", "LAST TELEMETRY")
    rows = []
    for d in devices:
        model = f"{d.model.get('name', '?')}@{d.model.get('version', '?')}" if d.model else "-"
        tel = f"{now - d.telemetry_ts:.0f}s ago" if d.telemetry_ts else "-"
        rows.append((d.device_id, "online" if d.online else "offline", d.group or "-", d.profile or "-",
                     model, d.agent_version or "-", tel))
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    online = sum(1 for d in devices if d.online)
    print(f"{len(devices)} device(s), {online} online")
    return 0


def _progress_printer(stream: Any) -> Any:
    def show(rollout: Any, s: dict[str, int]) -> None:
        parts = [f"{s.get(ExecState.SUCCEEDED, 0)} succeeded"]
        for key in (ExecState.FAILED, ExecState.REJECTED, ExecState.TIMED_OUT, ExecState.CANCELED,
                    ExecState.IN_PROGRESS, ExecState.SENT, ExecState.QUEUED):
            if s.get(key):
                parts.append(f"{s[key]} {key.value.lower().replace('_', ' ')}")
        if s.get("rolled_back"):
            parts.append(f"{s['rolled_back']} rolled back")
        stream.write(f"{time.strftime('%H:%M:%S')} {rollout.id} wave {s['wave'] + 1}/{rollout.waves} "
                     f"{rollout.state}: {', '.join(parts)}\n")
        stream.flush()
    return show


def _summary(store: Any, rollout_id: str) -> dict[str, Any]:
    from fleet.views import summary

    return dict(summary(store, rollout_id))


# What an agent too old for a command answers: the schema refusal, and what agents from before the
# command schema say to an update that names its manifest by URL.
_TOO_OLD = (AGENT_UPGRADE_HINT, "'manifest' must be the manifest object, got NoneType")


def _agents_to_upgrade(summary: dict[str, Any]) -> int:
    """Devices that refused the command because their agent is too old for it."""
    return sum(1 for e in summary["executions"] if any(mark in (e["reason"] or "") for mark in _TOO_OLD))


def _print_final(summary: dict[str, Any], as_json: bool) -> None:
    summary = dict(summary, agent_upgrade_needed=_agents_to_upgrade(summary))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    c = summary["counts"]
    what = f"{summary['name']}@{summary['version']}" if summary["kind"] == "deploy" else \
        f"rollback to {summary['version'] or 'previous'}"
    print(f"rollout {summary['rollout_id']} ({what}): {summary['state']}"
          + (f" - {summary['reason']}" if summary["reason"] else ""))
    print(f"  {c.get(ExecState.SUCCEEDED, 0)} succeeded, {c['failures']} failed, {c.get(ExecState.CANCELED, 0)} canceled, "
          f"{summary['rolled_back']} rolled back, of {len(summary['executions'])} device(s)")
    notable = [e for e in summary["executions"]
               if e["state"] not in (ExecState.SUCCEEDED, ExecState.CANCELED) or e["rollback"]]
    for e in notable[:LIST_MAX]:
        extra = f" rollback {e['rollback']}" if e["rollback"] else ""
        print(f"  {e['device_id']}: {e['state']}{extra}" + (f" ({e['reason']})" if e["reason"] else ""))
    if len(notable) > LIST_MAX:
        print(f"  ... {len(notable) - LIST_MAX} more: `edge-fleet status {summary['rollout_id']}` lists every device")
    if summary["agent_upgrade_needed"]:
        print(f"  {summary['agent_upgrade_needed']} device(s) refused the command as too new for their agent: "
              "upgrade edge-agent on them, then deploy again")


def _sign_key(args: argparse.Namespace) -> Any:
    """The private key for rollback statements (an aborted deploy's, or an operator rollback's)."""
    path = getattr(args, "sign_key", None)
    if path is None:
        return None
    if getattr(args, "command", None) == "rollback" and not args.to:
        raise ConfigError("--sign-key needs --to VERSION: a signed rollback statement names its version")
    from edgefleet.signing import load_private_key

    passphrase_file = getattr(args, "sign_key_passphrase_file", None)
    if passphrase_file:
        return load_private_key(path, _read_secret(passphrase_file, "--sign-key-passphrase-file").encode("utf-8"))
    return load_private_key(path, ask=_ask_passphrase)


def _ask_passphrase() -> bytes:
    """The signing key's passphrase from the terminal; never a prompt a script would hang on.

    Raises:
        ConfigError: stdin is not a terminal.
    """
    if not sys.stdin.isatty():
        raise ConfigError("the signing key is encrypted: pass --sign-key-passphrase-file FILE "
                          "(or run on a terminal to be asked)")
    import getpass

    return getpass.getpass("passphrase for the signing key: ").encode("utf-8")


def _load_signed_artifact(args: argparse.Namespace) -> tuple[Any, Any]:
    """The checked artifact, (re-)signed with ``--sign-key``, and that key: the key is opened once.

    Raises:
        ArtifactError: the artifact; ConfigError: the key or its passphrase.
    """
    from edgefleet.signing import sign_manifest
    from fleet.runner import Artifact, load_artifact

    artifact = load_artifact(args.artifact, None, force=args.force)
    key = _sign_key(args)
    if key is not None:
        artifact = Artifact(artifact.directory, artifact.manifest, artifact.raw, sign_manifest(artifact.raw, key))
    return artifact, key


def _model_url(base: str, file: str) -> str:
    return base if base.endswith(".tflite") else base.rstrip("/") + "/" + file


def _manifest_for(model_url: str | None, raw: dict[str, Any], server: Any) -> Any:
    """Where update commands send devices for the manifest: our server, or the copy hosted beside the model.

    Raises:
        TransportError / ArtifactError: the hosted ``manifest.json`` is missing or another manifest.
    """
    from fleet.artifacts import hosted_manifest, manifest_url_beside, serve_manifest

    if server is not None:
        return serve_manifest(server, raw)
    return hosted_manifest(manifest_url_beside(str(model_url)), raw)


def _stored_model(rollout: Any) -> Path:
    """The model a resumed rollout serves, checked against the manifest stored with the rollout.

    Raises:
        ArtifactError: the model is gone or was rebuilt since the rollout started.
    """
    from edgefleet.errors import ArtifactError
    from edgefleet.manifest import check_model_file, parse_manifest

    expected = parse_manifest(rollout.manifest or {}, f"rollout {rollout.id}").model
    model = Path(rollout.artifact_dir or ".") / expected.file
    if not model.is_file():
        raise ArtifactError(f"{model}: missing; the rollout cannot serve its model (use --artifact-url?)")
    try:
        check_model_file(model, expected)
    except ArtifactError as exc:
        raise ArtifactError(f"{exc}: changed since the rollout started; refusing to serve it") from exc
    return model


def _serve_again(address: str, advertise: str | None) -> Any:
    """The artifact server on the address a resumed rollout used; a free port if that one is taken."""
    from edgefleet.errors import TransportError
    from fleet.artifacts import ArtifactServer

    try:
        return ArtifactServer(address, advertise=advertise)
    except TransportError:
        host = address.rpartition(":")[0] or "0.0.0.0"
        return ArtifactServer(f"{host}:0", advertise=advertise)


def _policy_options(args: argparse.Namespace) -> dict[str, Any]:
    """The rollout policy as given on the command line, checked before anything is contacted."""
    from fleet.rollout import Policy, parse_canary

    Policy(canary=0, wave_base=args.wave_base, wave_factor=args.wave_factor, max_failure_pct=args.max_failure_pct,
           min_executed=args.min_executed, device_timeout_s=args.device_timeout)
    parse_canary(args.canary, 1)
    return {"canary": args.canary, "wave_base": args.wave_base, "wave_factor": args.wave_factor,
            "max_failure_pct": args.max_failure_pct, "min_executed": args.min_executed,
            "device_timeout_s": args.device_timeout, "rollback_on_abort": not args.no_rollback_on_abort}


def _target_request(args: argparse.Namespace) -> dict[str, Any]:
    if not (args.device or args.group or args.all):
        raise ConfigError("no target: give --device ID, --group G or --all")
    return {"devices": args.device, "group": args.group, "all": bool(args.all)}


def _follow(client: Any, rollout_id: str, wait: bool, as_json: bool, poll_s: float = 0.5) -> int:
    """Submitted: print the id and return, or (``wait``) poll the controller until the rollout ends."""
    from types import SimpleNamespace

    out = sys.stderr if as_json else sys.stdout
    if not wait:
        print(json.dumps({"rollout_id": rollout_id, "controller": client.url}) if as_json else
              f"rollout {rollout_id} submitted to {client.url}; follow it with "
              f"`edge-fleet status {rollout_id} --controller {client.url}`")
        return 0
    show = _progress_printer(out)
    last: Any = None
    while True:
        summary = client.get(f"/v1/rollouts/{rollout_id}")
        counts = dict(summary["counts"], rolled_back=summary["rolled_back"], wave=summary["current_wave"])
        key = (summary["state"], tuple(sorted(counts.items())))
        if key != last:
            last = key
            show(SimpleNamespace(id=rollout_id, waves=summary["waves"], state=summary["state"]), counts)
        if RolloutState(summary["state"]).terminal:
            _print_final(summary, as_json)
            return 0 if summary["state"] == RolloutState.SUCCEEDED.value else EXIT_ROLLOUT_FAILED
        time.sleep(poll_s)


def _deploy_via_controller(args: argparse.Namespace) -> int:
    from fleet.client import client_from_args

    if args.resume:
        raise ConfigError("--resume is for in-process rollouts: a controller resumes its rollouts by itself")
    if not args.artifact:
        raise ConfigError("deploy needs an ARTIFACT_DIR")
    artifact, _ = _load_signed_artifact(args)
    policy = _policy_options(args)
    targets = _target_request(args)
    client = client_from_args(args.controller, args.token_file, args.ca_file)
    url = None
    if args.artifact_url:
        url = _model_url(args.artifact_url, artifact.manifest.model.file)
    else:
        client.upload_artifact(artifact.manifest.model.sha256, artifact.model_path.read_bytes())
    created = client.post("/v1/rollouts", {"kind": "deploy", "manifest": artifact.raw, "signature": artifact.signature,
                                           "artifact_url": url, "targets": targets, "policy": policy,
                                           "force": args.force})
    return _follow(client, created["rollout_id"], args.wait, args.json)


def cmd_deploy(args: argparse.Namespace) -> int:
    if args.controller:
        return _deploy_via_controller(args)
    from edgefleet.mqtt import connect
    from fleet.artifacts import ArtifactServer
    from fleet.registry import collect, select_devices
    from fleet.rollout import Policy, parse_canary
    from fleet.runner import RolloutRunner, check_signing, create_deploy, resume_check
    from fleet.store import make_owner

    store = None
    server = None
    key = None
    owner = make_owner("deploy")
    try:
        if args.resume:
            if args.artifact or args.device or args.group or args.all:
                raise ConfigError("--resume continues a stored rollout: give no artifact or targets")
            store = _open_state(args)
            rollout = store.rollout(args.resume)
            resume_check(rollout)
            if not store.acquire(rollout.id, owner):
                lease = store.lease(rollout.id)
                raise ConfigError(f"rollout {rollout.id} is driven by {lease.driver} (its lease runs "
                                  f"{max(0.0, (lease.lease_until or 0) - time.time()):.0f}s more); nothing to resume")
            execs = store.executions(rollout.id)
            broker = _broker(args, rollout.broker)  # the password from the file or environment again
            key = _sign_key(args)
            if rollout.serve:
                model = _stored_model(rollout)
                server = _serve_again(rollout.serve, args.advertise)
                url = server.add(f"/{rollout.sha256}/model.tflite", model)
                if url != rollout.artifact_url:
                    from dataclasses import replace

                    rollout = replace(rollout, artifact_url=url)
            manifest = (_manifest_for(rollout.artifact_url, rollout.manifest or {}, server)
                        if rollout.kind == "deploy" else None)
        else:
            if not args.artifact:
                raise ConfigError("deploy needs an ARTIFACT_DIR (or --resume ROLLOUT_ID)")
            broker = _broker(args)
            artifact, key = _load_signed_artifact(args)
            _policy_options(args)  # options, before the broker
            registry = collect(broker)
            devices = select_devices(registry, args.device, args.group, args.all)
            check_signing(artifact, devices)
            policy = Policy(canary=parse_canary(args.canary, len(devices)), wave_base=args.wave_base,
                            wave_factor=args.wave_factor, max_failure_pct=args.max_failure_pct,
                            min_executed=args.min_executed, device_timeout_s=args.device_timeout,
                            rollback_on_abort=not args.no_rollback_on_abort)
            serve = None
            if args.artifact_url:
                url = _model_url(args.artifact_url, artifact.manifest.model.file)
            else:
                server = ArtifactServer(args.serve, advertise=args.advertise)
                url = server.add(f"/{artifact.manifest.model.sha256}/model.tflite", artifact.model_path)
                host = args.serve.rpartition(":")[0] or "0.0.0.0"
                serve = f"{host}:{server.port}"
            manifest = _manifest_for(url, artifact.raw, server)  # a hosted one is checked before anything is sent
            store = _open_state(args)  # only now: a refused deploy leaves no trace
            rollout, execs = create_deploy(store, artifact, devices, policy, url, serve, str(broker),
                                           force=args.force, owner=owner, target=_target_text(args, devices))
        out = sys.stderr if args.json else sys.stdout
        if args.wait or args.resume:
            out.write(f"rollout {rollout.id}: {len(execs)} device(s) in {rollout.waves} wave(s); "
                      f"artifact at {rollout.artifact_url}\n")
            out.flush()
        with connect(broker, client_id=f"edge-fleet-{rollout.id}", persistent=True) as client:
            runner = RolloutRunner(store, client, rollout, execs,
                                   progress=_progress_printer(out) if args.wait else None, owner=owner,
                                   notice=_notice, sign_key=key, manifest=manifest)
            if args.resume:  # retained states credit devices that finished while we were away
                from fleet.registry import STATE_TOPICS

                client.subscribe(STATE_TOPICS)
            final = runner.run()
            client.close(end_session=True)  # the rollout is over: nothing should queue for it
        _print_final(_summary(store, final.id), args.json)
        return 0 if final.state is RolloutState.SUCCEEDED else EXIT_ROLLOUT_FAILED
    finally:
        if server:
            server.close()
        if store is not None:
            store.close()


def _notice(text: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} {text}\n")
    sys.stderr.flush()


def _target_text(args: argparse.Namespace, devices: Sequence[Any]) -> str:
    return f"group {args.group!r}" if args.group else "all devices" if args.all else f"{len(devices)} device(s)"


class _LocalStatus:
    """``status`` from a store on this machine: the same dicts the controller's API returns."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def listing(self) -> list[dict[str, Any]]:
        from fleet.views import listing

        return listing(self.store)

    def summary(self, rollout_id: str) -> dict[str, Any]:
        return _summary(self.store, rollout_id)

    def history(self, rollout_id: str, device_id: str) -> list[dict[str, Any]]:
        from fleet.views import device_history

        return device_history(self.store, rollout_id, device_id)


class _RemoteStatus:
    def __init__(self, client: Any) -> None:
        self.client = client

    def listing(self) -> list[dict[str, Any]]:
        return list(self.client.get("/v1/rollouts"))

    def summary(self, rollout_id: str) -> dict[str, Any]:
        return dict(self.client.get(f"/v1/rollouts/{rollout_id}"))

    def history(self, rollout_id: str, device_id: str) -> list[dict[str, Any]]:
        from urllib.parse import quote

        return list(self.client.get(f"/v1/rollouts/{rollout_id}/history?device={quote(device_id)}"))


def cmd_status(args: argparse.Namespace) -> int:
    from fleet.store import default_data_dir

    if args.device and not args.rollout_id:
        raise ConfigError("--device needs a ROLLOUT_ID")
    store = None
    if args.controller:
        from fleet.client import client_from_args

        source: Any = _RemoteStatus(client_from_args(args.controller, args.token_file, args.ca_file))
        where = args.controller
    else:
        state = args.state or os.environ.get("EDGEFLEET_STATE")
        db = Path(args.data_dir or default_data_dir()) / "fleet.db"
        if not state and not db.is_file():  # reading must not create a data dir
            if args.rollout_id:
                raise ConfigError(f"unknown rollout {args.rollout_id!r}: no rollouts recorded in {db.parent}")
            print("[]" if args.json else f"no rollouts in {db.parent}")
            return 0
        store = _open_state(args)
        source, where = _LocalStatus(store), store.path
    try:
        return _show_status(args, source, where)
    finally:
        if store is not None:
            store.close()


def _show_status(args: argparse.Namespace, source: Any, where: str) -> int:
    if args.rollout_id and args.device:
        rows = source.history(args.rollout_id, args.device)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        for h in rows:
            when = time.strftime("%H:%M:%S", time.localtime(h["ts"]))
            who = h["device_id"] or "(rollout)"
            detail = ", ".join(f"{k}={v}" for k, v in (h["detail"] or {}).items() if v is not None)
            print(f"{when}  {who:<20} {h['event']:<12} {detail}")
        return 0
    if args.rollout_id:
        summary = source.summary(args.rollout_id)
        if args.json:
            print(json.dumps(summary, indent=2))
            return 0
        c = summary["counts"]
        print(f"rollout {summary['rollout_id']} {summary['kind']} {summary['name'] or ''}@"
              f"{summary['version'] or 'previous'}: {summary['state']}"
              + (f" - {summary['reason']}" if summary["reason"] else ""))
        print(f"  wave {summary['current_wave'] + 1}/{summary['waves']}, {c.get(ExecState.SUCCEEDED, 0)} succeeded, "
              f"{c['failures']} failed, {summary['rolled_back']} rolled back"
              + (f"; driven by {summary['driver']}" if summary.get("driver") else ""))
        idle = time.time() - summary["updated"]
        if not RolloutState(summary["state"]).terminal and idle > STALE_S:
            print(f"  no progress recorded for {idle:.0f}s: if its deploy process is gone, continue it with "
                  f"`edge-fleet deploy --resume {summary['rollout_id']}` (a controller adopts it by itself)")
        header = ("DEVICE", "WAVE", "STATE", "OTA", "ROLLBACK", "REASON")
        rows = [(e["device_id"], str(e["wave"]), e["state"], e["ota_state"] or "-", e["rollback"] or "-",
                 e["reason"] or "") for e in summary["executions"]]
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
        for r in [header, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        return 0
    listing = source.listing()
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    if not listing:
        print(f"no rollouts in {where}")
    for r in listing:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"]))
        print(f"{r['rollout_id']}  {when}  {r['kind']:<8} {r['name'] or '-'}@{r['version'] or 'previous'}  "
              f"{r['state']:<11} {r['succeeded']}/{r['devices']} succeeded, {r['failures']} failed")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    if args.to is not None:
        from edgefleet.manifest import parse_version

        parse_version(args.to)
    if args.controller:
        from fleet.client import client_from_args

        targets = _target_request(args)
        client = client_from_args(args.controller, args.token_file, args.ca_file)
        created = client.post("/v1/rollouts", {"kind": "rollback", "targets": targets, "to": args.to,
                                               "device_timeout_s": args.device_timeout, "force": args.force})
        return _follow(client, created["rollout_id"], args.wait, args.json)
    from edgefleet.mqtt import connect
    from fleet.registry import collect, select_devices
    from fleet.runner import RolloutRunner, create_rollback
    from fleet.store import make_owner

    broker = _broker(args)
    key = _sign_key(args)  # before the broker: a wrong passphrase is not worth a connection
    registry = collect(broker)
    devices = select_devices(registry, args.device, args.group, args.all)
    store = _open_state(args)
    owner = make_owner("rollback")
    try:
        rollout, execs = create_rollback(store, devices, args.to, str(broker), args.device_timeout, owner=owner,
                                         target=_target_text(args, devices), force=args.force)
        with connect(broker, client_id=f"edge-fleet-{rollout.id}", persistent=args.wait) as client:
            runner = RolloutRunner(store, client, rollout, execs,
                                   progress=_progress_printer(sys.stderr if args.json else sys.stdout)
                                   if args.wait else None, owner=owner, notice=_notice, sign_key=key)
            if args.wait:
                final = runner.run()
                client.close(end_session=True)
            else:
                sent = runner.start()
                print(json.dumps({"rollout_id": rollout.id, "kind": "rollback", "sent": sent,
                                  "devices": len(execs)}) if args.json else
                      f"rollback {rollout.id} sent to {sent} device(s); use --wait to follow it")
                return 0
        _print_final(_summary(store, final.id), args.json)
        return 0 if final.state is RolloutState.SUCCEEDED else EXIT_ROLLOUT_FAILED
    finally:
        store.close()


def cmd_watch(args: argparse.Namespace) -> int:
    from fleet.watch import watch, watch_controller

    if args.frames is not None and args.frames < 1:
        raise ConfigError("--frames: expected at least 1")
    if args.interval <= 0:
        raise ConfigError("--interval: expected seconds > 0")
    if args.controller:
        from fleet.client import client_from_args

        client = client_from_args(args.controller, args.token_file, args.ca_file)
        watch_controller(client, group=args.group, frames=args.frames, interval=args.interval, as_json=args.json)
        return 0
    watch(_broker(args), group=args.group, frames=args.frames, interval=args.interval, as_json=args.json)
    return 0


def _until_signal() -> Any:
    """An Event set by SIGTERM or SIGINT (systemd stops the controller with SIGTERM)."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *a: stop.set())
    return stop


def cmd_serve(args: argparse.Namespace) -> int:
    from fleet.api import load_token
    from fleet.controller import Controller, ControllerSettings
    from fleet.store import default_data_dir, state_url

    if args.metrics_refresh <= 0 or args.stale <= 0:
        raise ConfigError("--metrics-refresh and --stale: expected seconds > 0")
    data = Path(args.data_dir or default_data_dir())
    settings = ControllerSettings(
        state=state_url(args.state, args.data_dir), broker=_broker(args), token=load_token(args.token_file),
        listen=args.listen, tls_cert=args.tls_cert, tls_key=args.tls_key, serve=args.serve,
        advertise=args.advertise, metrics=None if args.metrics == "off" else args.metrics,
        metrics_refresh_s=args.metrics_refresh, stale_s=args.stale, cache_dir=data / "artifacts",
        sign_key=_sign_key(args))
    stop = _until_signal()
    controller = Controller(settings)
    try:
        controller.start()
        metrics = controller.metrics.url if controller.metrics else "off"
        if args.json:
            print(json.dumps({"ready": "controller", "controller_id": controller.controller_id,
                              "api": controller.api.url, "metrics": metrics,
                              "artifacts": controller.artifacts.base_url, "state": controller._store.path}),
                  flush=True)
        else:
            print(f"ready: controller {controller.controller_id} api {controller.api.url} metrics {metrics} "
                  f"artifacts {controller.artifacts.base_url} state {controller._store.path}", flush=True)
        stop.wait()
    finally:
        controller.close()
    return 0


def cmd_exporter(args: argparse.Namespace) -> int:
    import functools
    import threading

    from edgefleet.mqtt import connect
    from fleet.exporter import EXPORTER_TOPICS, FleetIndex, MetricsServer, consume

    if args.refresh <= 0 or args.stale <= 0:
        raise ConfigError("--refresh and --stale: expected seconds > 0")
    stop = _until_signal()
    index = FleetIndex(stale_s=args.stale)
    store = None
    rollouts = None
    if args.state:
        from fleet.store import open_store
        from fleet.views import listing

        store = open_store(args.state, migrate=False)
        rollouts = functools.partial(listing, store, limit=20)
    with connect(_broker(args)) as client:
        client.subscribe(EXPORTER_TOPICS)
        feeder = threading.Thread(target=consume, args=(index, client.messages, stop), daemon=True)
        feeder.start()
        server = MetricsServer(args.listen, index, rollouts, refresh_s=args.refresh)
        print(json.dumps({"ready": "exporter", "metrics": server.url}) if args.json else
              f"ready: exporter {server.url}", flush=True)
        try:
            stop.wait()
        finally:
            server.close()
            if store is not None:
                store.close()
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from fleet.store import SCHEMA_VERSION, open_store, state_url

    store = open_store(state_url(args.state, args.data_dir), migrate=True)
    try:
        if args.json:
            print(json.dumps({"state": store.path, "schema_version": store.schema_version(),
                              "supported_schema_version": SCHEMA_VERSION}))
        else:
            print(f"{store.path}: schema version {store.schema_version()} (this edge-fleet: {SCHEMA_VERSION})")
    finally:
        store.close()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fleet.export import export

    n = export(_broker(args), args.out, args.duration)
    print(json.dumps({"records": n, "out": str(args.out)}) if args.json else f"wrote {n} record(s) to {args.out}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from edgefleet.testing.simulator import run_from_args

    return run_from_args(args)  # one "ready" line (a JSON object with --json), then runs until stopped


HANDLERS = {"keygen": cmd_keygen, "devices": cmd_devices, "deploy": cmd_deploy, "status": cmd_status,
            "rollback": cmd_rollback, "watch": cmd_watch, "export": cmd_export, "simulate": cmd_simulate,
            "serve": cmd_serve, "exporter": cmd_exporter, "migrate": cmd_migrate}


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return int(HANDLERS[args.command](args))


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
