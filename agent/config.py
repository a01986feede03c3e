"""``agent.yaml``: the device service configuration, validated strictly.

The schema below is the documentation of every key (units in the descriptions); unknown keys,
missing keys and wrong values raise :class:`~edgefleet.errors.ConfigError` with one line naming the
file and the key. The models only validate: files (passwords, keys, models) are read by the
service at start-up, never here. Relative paths are taken relative to the config file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from agent.engine import DEADLINE_FACTOR, DEADLINE_FLOOR_S
from edgefleet.addresses import parse_host_port
from edgefleet.errors import ConfigError
from edgefleet.ids import ID_RULE, validate_id
from edgefleet.mqtt import BrokerURL, parse_broker_urls
from edgefleet.profiles import CacheSettings, format_validation_error, read_yaml_file

__all__ = [
    "AgentConfig",
    "BrokerConfig",
    "CacheOverrides",
    "CommandsConfig",
    "HttpConfig",
    "InferenceConfig",
    "OutboxConfig",
    "SinksConfig",
    "SourceConfig",
    "TelemetryConfig",
    "load_config",
    "parse_config",
]

MAX_CONFIG_BYTES = 1024 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(_Strict):
    url: str | None = Field(default=None, description="mqtt://host:port (plain) or mqtts://host:port (TLS; default port 8883)")
    urls: list[str] | None = Field(
        default=None, min_length=1, max_length=16,
        description="The nodes of one broker cluster (instead of url): tried in order, the next one on loss of a node")
    username: str | None = Field(default=None, description="MQTT username (usually the device id)")
    password_file: Path | None = Field(default=None, description="File holding the MQTT password (one line)")
    ca_file: Path | None = Field(default=None, description="CA bundle that signed the broker certificate (mqtts)")
    cert_file: Path | None = Field(default=None, description="Client certificate for mutual TLS (optional)")
    key_file: Path | None = Field(default=None, description="Private key of cert_file")
    keepalive_s: int = Field(default=30, ge=1, le=3600,
                             description="MQTT keepalive, s; the broker announces the Last Will after ~1.5x")
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        default="auto", description="MQTT version; auto tries 5 and falls back to 3.1.1 if refused")
    session_expiry_s: int = Field(
        default=3600, ge=0, le=7 * 86_400,
        description="Broker keeps our subscriptions and queues commands this long while we are offline, s "
                    "(0 = clean session; with MQTT 3.1.1 any value > 0 means a persistent session)")
    reconnect_min_s: float = Field(default=0.5, gt=0, le=60, description="First reconnect delay, s")
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600, description="Longest reconnect delay, s")

    @field_validator("url", "urls")
    @classmethod
    def _parses(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is not None:
            try:
                parse_broker_urls(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from exc
        return value

    @model_validator(mode="after")
    def _tls_pairs(self) -> BrokerConfig:
        if (self.url is None) == (self.urls is None):
            raise ValueError("give either url or urls")
        if len({n.tls for n in self.nodes}) > 1:
            raise ValueError("urls: all nodes mqtt:// or all mqtts://")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.cert_file is not None and not self.tls:
            raise ValueError("a client certificate needs an mqtts:// url")
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs a username")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self

    @property
    def nodes(self) -> tuple[BrokerURL, ...]:
        """Every broker node, in the order they are tried."""
        return parse_broker_urls(self.urls if self.urls is not None else str(self.url))

    @property
    def tls(self) -> bool:
        return self.nodes[0].tls


class OutboxConfig(_Strict):
    max_rows: int = Field(default=10_000, ge=10, description="Most telemetry/event messages kept while offline")
    max_bytes: int = Field(default=16 * 1024 * 1024, ge=4096,
                           description="Most payload bytes kept while offline; the oldest are dropped first")
    drain_per_s: float = Field(default=50.0, gt=0, description="Publish rate when draining a backlog, messages/s")
    max_inflight: int = Field(default=20, ge=1, le=1000, description="Unacknowledged QoS 1 publishes at once")
    resend_after_s: float = Field(default=30.0, gt=0,
                                  description="Publish again when unacknowledged this long while connected, s")


class CommandsConfig(_Strict):
    rate_per_min: float = Field(default=60.0, gt=0, description="Commands executed per minute (burst = 10)")
    remember: int = Field(default=4096, ge=1, le=100_000,
                          description="Unexpired command ids remembered (on disk) so a repeat is not re-executed; "
                                      "when full, new commands are refused as busy until ids expire")
    max_ttl_s: float = Field(default=86_400.0, gt=0, description="Longest ttl_s a command may ask for, s")


class HttpConfig(_Strict):
    listen: str | None = Field(default="127.0.0.1:8501",
                               description="host:port of the REST endpoint (loopback by default); null disables it")
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, description="Largest request body, bytes")
    max_instances: int = Field(default=64, ge=1, description="Largest batch in one predict request")
    max_connections: int = Field(default=32, ge=1, le=1024,
                                 description="Connections served at once; more get a 503")

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parse_host_port(value, "listen")
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        return value

    @property
    def address(self) -> tuple[str, int] | None:
        if self.listen is None:
            return None
        return parse_host_port(self.listen, "listen")


class SourceConfig(_Strict):
    type: Literal["directory", "none"] = Field(default="none", description="Where inputs come from besides HTTP")
    path: Path | None = Field(default=None, description="Watched directory (type: directory)")
    after: Literal["move", "delete"] = Field(
        default="move", description="What to do with an inferred file: move to done/ or delete it")
    poll_interval_s: float = Field(default=0.5, gt=0, le=60, description="Directory scan period, s")
    settle_s: float = Field(default=0.1, ge=0, le=60,
                            description="Leave a file alone until it is this old (writers that do not rename), s")
    max_file_bytes: int = Field(default=32 * 1024 * 1024, ge=1, description="Larger files go to failed/, bytes")
    camera_id: str | None = Field(
        default=None, min_length=1, max_length=256,
        description="What this camera sees, for the cache evidence carried across restarts: change it when the "
                    "camera is moved or replaced, and the cache starts cold (null: the source type and path)")
    cache_evidence: bool = Field(
        default=True, description="Keep the cache's verdict counts in state_dir across restarts of the same model "
                                  "on this camera (docs/cache.md, \"Evidence across restarts\")")

    @property
    def evidence_source(self) -> str:
        """The camera id the cache's carried evidence is keyed by."""
        if self.camera_id is not None:
            return self.camera_id
        derived = f"directory:{self.path}" if self.type == "directory" else "api"
        return derived if len(derived) <= 256 else "directory:sha256:" + hashlib.sha256(derived.encode()).hexdigest()

    @model_validator(mode="after")
    def _path(self) -> SourceConfig:
        if self.type == "directory" and self.path is None:
            raise ValueError("type 'directory' needs a path")
        return self


class SinksConfig(_Strict):
    jsonl: Path | None = Field(default=None, description="Append one JSON line per result to this file")
    jsonl_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024,
                                 description="Rotate the JSONL file (one .1 kept) past this size, bytes")
    results_topic: bool = Field(default=False,
                                description="Also publish each result (QoS 0, dropped while offline)")


class InferenceConfig(_Strict):
    deadline_s: float | None = Field(
        default=None, gt=0,
        description="Seconds one interpreter call may take before it counts as stuck (healthz 503, no watchdog "
                    "ping) and the longest wait for a free interpreter (REST 503); null = "
                    "max(deadline_floor_s, deadline_factor x the profile's latency_budget_ms)")
    deadline_factor: float = Field(default=DEADLINE_FACTOR, ge=1, description="Multiple of the latency budget")
    deadline_floor_s: float = Field(default=DEADLINE_FLOOR_S, gt=0, description="Shortest derived deadline, s")


class TelemetryConfig(_Strict):
    interval_s: float = Field(default=10.0, ge=0.1, le=86_400, description="Telemetry period, s")
    drift_window: int = Field(default=1000, ge=10, description="Recent results compared with the baseline")


def _all_optional(model: type[BaseModel], name: str) -> type[_Strict]:
    """``model`` with every field optional (None = not overridden), same bounds and descriptions."""
    fields: dict[str, Any] = {}
    for key, info in model.model_fields.items():
        optional = FieldInfo.merge_field_infos(info, default=None)
        optional.description = f"{info.description}; null = the profile's"
        fields[key] = (info.annotation | None, optional)
    return create_model(name, __base__=_Strict, __doc__=f"Overrides of {model.__name__}.", **fields)


CacheOverrides = _all_optional(CacheSettings, "CacheOverrides")
"""agent.yaml's ``cache:`` block: any :class:`~edgefleet.profiles.CacheSettings` key, overriding
the profile's value (``overrides.model_dump(exclude_none=True)`` is what was set)."""


class AgentConfig(_Strict):
    device_id: str = Field(description="This device's id: a topic level and the MQTT username")
    group: str = Field(default="default", description="Group for group-wide commands")
    fleet: str | None = Field(default=None,
                              description="Fleet this device belongs to (a manifest naming another fleet is refused)")
    profile: str = Field(description="Device profile name (device_profiles/) or path to a .yaml")
    state_dir: Path = Field(description="Everything the agent persists: models, journal, outbox, counters")
    model: Path | None = Field(default=None, description="Initial artifact dir or .tflite for the first boot")
    broker: BrokerConfig
    trusted_keys: list[Path] = Field(
        default_factory=list,
        description="Ed25519 public keys (PEM); when any is given, every update must be signed by one")
    http: HttpConfig = HttpConfig()
    source: SourceConfig = SourceConfig()
    sinks: SinksConfig = SinksConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    cache: CacheOverrides = CacheOverrides()  # type: ignore[valid-type]
    inference: InferenceConfig = InferenceConfig()
    outbox: OutboxConfig = OutboxConfig()
    commands: CommandsConfig = CommandsConfig()

    @field_validator("device_id", "group", "fleet")
    @classmethod
    def _topic_level(cls, value: str | None) -> str | None:
        """Ids that become MQTT topic levels or are matched against manifests: one rule."""
        if value is None:
            return None
        try:
            return validate_id(value)
        except ConfigError as exc:
            raise ValueError(f"expected {ID_RULE} (it becomes an MQTT topic level)") from exc

    def resolved(self, base: Path) -> AgentConfig:
        """A copy with every relative path made relative to ``base`` (the config file's folder)."""

        def fix(p: Path | None) -> Path | None:
            return None if p is None else (p if p.is_absolute() else (base / p))

        broker = self.broker.model_copy(update={
            "password_file": fix(self.broker.password_file), "ca_file": fix(self.broker.ca_file),
            "cert_file": fix(self.broker.cert_file), "key_file": fix(self.broker.key_file)})
        profile = self.profile
        if profile.endswith((".yaml", ".yml")) or "/" in profile:
            profile = str(fix(Path(profile)))
        return self.model_copy(update={
            "state_dir": fix(self.state_dir), "model": fix(self.model), "broker": broker,
            "profile": profile, "trusted_keys": [fix(k) for k in self.trusted_keys],
            "source": self.source.model_copy(update={"path": fix(self.source.path)}),
            "sinks": self.sinks.model_copy(update={"jsonl": fix(self.sinks.jsonl)}),
        })


def parse_config(data: object, source: str = "agent.yaml", base: Path | None = None) -> AgentConfig:
    """Validate an already-parsed config mapping.

    Raises:
        ConfigError: naming ``source`` and the first bad key.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
    try:
        cfg = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from exc
    return cfg.resolved(base) if base is not None else cfg


def load_config(path: Path | str) -> AgentConfig:
    """Read and validate ``agent.yaml``; relative paths become relative to its folder.

    Raises:
        ConfigError: the file is missing, too large, not YAML, or does not fit the schema.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes, expected at most {MAX_CONFIG_BYTES}")
    data = read_yaml_file(path)
    return parse_config(data, str(path), base=path.parent.resolve())
