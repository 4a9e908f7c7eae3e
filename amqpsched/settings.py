"""All settings in one place: ``AMQPSCHED_*`` environment variables and an optional ``.env``."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (safe for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class Settings(BaseSettings):
    """Settings shared by the scheduler, the workers and the client SDK."""

    model_config = SettingsConfigDict(
        env_prefix="AMQPSCHED_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    amqp_url: SecretStr = Field(
        default=SecretStr(DEFAULT_AMQP_URL),
        description="Broker URL (amqp:// or amqps://). The password never appears in logs.",
    )
    tls_ca_file: str | None = Field(
        default=None,
        description="CA bundle to verify the broker's certificate (amqps://; unset: system CAs).",
    )
    tls_cert_file: str | None = Field(
        default=None, description="Client certificate for amqps:// (mutual TLS), PEM."
    )
    tls_key_file: str | None = Field(
        default=None, description="Private key of the client certificate, PEM."
    )
    namespace: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9_-]{0,64}$",
        description="Prefix for every queue and exchange name, to run independent systems on one "
        "vhost (empty: the names of docs/protocol.md as they stand).",
    )
    default_timeout: float = Field(
        default=300.0,
        gt=0,
        description="Seconds a task's answer is due within, when the client gives no timeout.",
    )
    max_timeout: float = Field(
        default=7 * 24 * 3600.0, gt=0, description="Largest timeout a client may ask for, seconds."
    )
    max_message_bytes: int = Field(
        default=8 * 1024 * 1024, gt=0, description="Largest submission body accepted, bytes."
    )
    heartbeat_interval: float = Field(
        default=2.0, gt=0, description="Seconds between a worker's heartbeats."
    )
    heartbeat_miss_limit: int = Field(
        default=3,
        ge=1,
        description="Heartbeats a worker may miss before the scheduler declares it dead.",
    )
    result_retention: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds a finished task's answer is kept for status and result queries.",
    )
    journal_retention: int = Field(
        default=86400,
        gt=0,
        description="Seconds the scheduler's journal (a RabbitMQ stream) keeps its records; a "
        "restarted scheduler recovers the tasks of that window. Fixed once the stream exists.",
    )
    max_tracked_tasks: int = Field(
        default=200_000,
        gt=0,
        description="Most task records the scheduler keeps; the oldest finished ones go first.",
    )
    scheduler_prefetch: int = Field(
        default=512, gt=0, description="Messages the scheduler takes from each queue at once."
    )
    delivery_limit: int = Field(
        default=10,
        ge=1,
        description="Deliveries of one task before it is dead-lettered as poison (its worker "
        "died running it each time).",
    )
    idempotency_window: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds a submission's idempotency key maps to its task.",
    )
    concurrency: int = Field(
        default=8, gt=0, description="Tasks a worker runs at once (its prefetch follows it)."
    )
    shutdown_timeout: float = Field(
        default=30.0,
        ge=0,
        description="Seconds a stopping worker waits for running tasks before it gives up on them.",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port for /metrics, /livez and /readyz (unset: not served).",
    )
    log_level: str = Field(default="INFO", description="Logging level: DEBUG, INFO, WARNING...")
    log_json: bool = Field(
        default=False,
        description="Log one JSON object per line, with task_id, capability, attempt, worker_id "
        "and trace_id when a line is about a task.",
    )

    def amqp_url_masked(self) -> str:
        return mask_url(self.amqp_url.get_secret_value())

    def __repr_args__(self):  # type: ignore[no-untyped-def]
        # SecretStr already hides the password; keep the masked URL visible for debugging.
        for key, value in super().__repr_args__():
            yield (key, self.amqp_url_masked() if key == "amqp_url" else value)


def env_example() -> str:
    """The text of ``.env.example``: every setting, its default and what it does."""
    lines = [
        "# amqpsched settings: every one, with its default. Copy to .env and edit what you need.",
        "# Environment variables win over .env. Regenerate with: amqpsched env-example",
        "",
    ]
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, SecretStr):
            default = default.get_secret_value()
        if isinstance(default, float) and default.is_integer():
            default = int(default)
        lines.append(f"# {field.description}")
        key = f"AMQPSCHED_{name.upper()}"
        lines.append(f"# {key}=9100" if default is None else f"{key}={default}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
