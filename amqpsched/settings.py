"""All settings in one place: ``AMQPSCHED_*`` environment variables and an optional ``.env``."""

from __future__ import annotations

from typing import Literal
from urllib.parse import SplitResult, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"
AMQP_SCHEMES = ("amqp", "amqps")
#: Separates the broker URLs of ``AMQPSCHED_AMQP_URL`` (a ``,`` in a password is written ``%2C``).
URL_SEPARATOR = ","


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


def _parse_amqp_url(url: str) -> SplitResult | None:
    """``url`` split, if it is an ``amqp://`` or ``amqps://`` URL with a host; else None."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        return None
    if parts.scheme not in AMQP_SCHEMES or not parts.hostname:
        return None
    return parts


def split_urls(value: str) -> tuple[str, ...]:
    """The broker addresses in ``value``: one URL, or several separated by commas (the nodes of a
    cluster). All must use the same scheme (TLS applies to every address or to none) and vhost.

    Raises :class:`ValueError` whose message holds no part of ``value`` (it may hold passwords).
    """
    urls = tuple(part.strip() for part in value.split(URL_SEPARATOR) if part.strip())
    if not urls:
        raise ValueError("no broker URL")
    schemes: set[str] = set()
    vhosts: set[str] = set()
    for number, url in enumerate(urls, 1):
        parts = _parse_amqp_url(url)
        if parts is None:
            which = f"broker URL {number} of {len(urls)}" if len(urls) > 1 else "the broker URL"
            hint = f" (a {URL_SEPARATOR!r} in a password is written %2C)" if len(urls) > 1 else ""
            raise ValueError(f"{which} is not an amqp:// or amqps:// URL with a host{hint}")
        schemes.add(parts.scheme)
        vhosts.add(parts.path if parts.path not in ("", "/") else "/")
    if len(schemes) > 1:
        raise ValueError("the broker URLs mix amqp:// and amqps://: use TLS for all or for none")
    if len(vhosts) > 1:
        raise ValueError("the broker URLs name different vhosts")
    return urls


def mask_urls(value: str) -> str:
    """``value`` (one broker URL or several, comma-separated) safe for logs: each password
    becomes ``***``, and a part that is not a URL is not shown at all."""
    shown = []
    for part in value.split(URL_SEPARATOR):
        url = part.strip()
        if url:
            shown.append(mask_url(url) if _parse_amqp_url(url) else "<not a URL>")
    return URL_SEPARATOR.join(shown)


class Settings(BaseSettings):
    """Settings shared by the scheduler, the workers and the client SDK."""

    model_config = SettingsConfigDict(
        env_prefix="AMQPSCHED_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,  # a rejected broker URL may hold a password
    )

    amqp_url: SecretStr = Field(
        default=SecretStr(DEFAULT_AMQP_URL),
        description="Broker URL (amqp:// or amqps://), or several separated by commas (the nodes "
        "of a cluster): connect to the first that answers, fail over to the others when the "
        "connection is lost. The password never appears in logs.",
    )
    connect_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds one connection attempt to one broker address may take before the "
        "next address is tried.",
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
    max_result_bytes: int = Field(
        default=128 * 1024 * 1024,
        gt=0,
        description="Most bytes of results the scheduler keeps for status and result queries "
        "(results of 2 KiB and more count); past it the tasks answered first are forgotten "
        "first, before result_retention.",
    )
    max_waiting_records: int = Field(
        default=500,
        ge=0,
        description="Waiting tasks (dispatched, not started) the scheduler keeps whole in memory; "
        "past it, the newest are kept in about 30 bytes each and read back from the journal when "
        "needed (a query, a worker's event, their deadline).",
    )
    submit_prefetch: int = Field(
        default=64,
        gt=0,
        description="Messages the scheduler takes from tasks.submit at once (a submit_batch "
        "holds up to 256 tasks; taken messages wait in its memory).",
    )
    scheduler_prefetch: int = Field(
        default=512,
        gt=0,
        description="Messages the scheduler takes from each other queue (results) at once.",
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
    event_loop: Literal["asyncio", "uvloop", "auto"] = Field(
        default="asyncio",
        description="The event loop of the scheduler, workers and the CLI: asyncio's own, "
        "uvloop (pip install uvloop), or auto: uvloop if it is installed. uvloop measured no "
        "faster here (docs/benchmarks.md).",
    )
    gc_tuning: bool = Field(
        default=True,
        description="The scheduler and workers, once started, freeze the objects made at start "
        "out of Python's cyclic garbage collector and run it less often (gen0 threshold "
        "10,000 for the scheduler, 100,000 for workers): about a fifth of their CPU under load "
        "went to it (docs/benchmarks.md).",
    )
    direct_answers: bool = Field(
        default=True,
        description="Clients take a worker's succeeded outcome as their answer, one hop before "
        "the scheduler's (docs/protocol.md, section 16); workers send it. Off: every answer "
        "comes from the scheduler.",
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

    @field_validator("amqp_url")
    @classmethod
    def _valid_broker_urls(cls, value: SecretStr) -> SecretStr:
        split_urls(value.get_secret_value())
        return value

    def amqp_urls(self) -> tuple[SecretStr, ...]:
        """The broker addresses, in the order they are tried."""
        return tuple(SecretStr(url) for url in split_urls(self.amqp_url.get_secret_value()))

    def amqp_url_masked(self) -> str:
        return mask_urls(self.amqp_url.get_secret_value())

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
        lines.append(f"# {key}=" if default is None else f"{key}={default}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
