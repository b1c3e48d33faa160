"""Stream and subject names, message ids and stream configurations (one place for both sides)."""

from __future__ import annotations

from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

DISPATCH_STREAM = "DISPATCH"
EVENTS_STREAM = "EVENTS"
LOGS_STREAM = "LOGS"

# Durable consumer of the EVENTS stream on the control-plane side (shared by replicas).
EVENTS_DURABLE = "controlplane-events"
EVENTS_SUBJECTS = "gpuplane.events.>"
# How long JetStream remembers message ids for de-duplication.
DEDUP_WINDOW_SECONDS = 600.0


def dispatch_subject(host_id: str) -> str:
    return f"gpuplane.dispatch.{host_id}"


def events_prefix(host_id: str) -> str:
    """A host's reports go under this prefix (its NATS user may publish only there)."""
    return f"gpuplane.events.{host_id}"


def events_subject(host_id: str, job_id: str) -> str:
    return f"{events_prefix(host_id)}.{job_id}"


def host_of_events_subject(subject: str) -> str | None:
    """The host named by a report's subject; None for the host-less form of earlier
    releases (gpuplane.events.<job>), which only an open (unauthenticated) server lets in."""
    parts = subject.split(".")
    return parts[2] if len(parts) == 4 else None


def logs_prefix(host_id: str) -> str:
    return f"gpuplane.logs.{host_id}"


def logs_subject(host_id: str, job_id: str, attempt: int) -> str:
    return f"{logs_prefix(host_id)}.{job_id}.{attempt}"


# Core NATS (no stream): a control plane that stored a host command tells the other replicas
# to look at once instead of at their next poll. Payload: the host id.
COMMANDS_STORED_SUBJECT = "gpuplane.control.commands"
# Core NATS (no stream): a service or a replica's job changed on some replica; the gateways
# reread its route. Payload: "<origin> <service or job id>".
ROUTES_CHANGED_SUBJECT = "gpuplane.control.routes"


def dispatch_durable(host_id: str) -> str:
    """The durable pull consumer through which one host takes its dispatch messages."""
    return f"host-{host_id}"


def dispatch_msg_id(job_id: str, attempt: int) -> str:
    return f"{job_id}.{attempt}"


def report_msg_id(job_id: str, attempt: int, seq: int) -> str:
    return f"{job_id}.{attempt}.{seq}"


# Header on a log message that marks the end of an attempt's logs.
LOG_END_HEADER = "Gpuplane-Log-End"
# Header naming the stream ("stdout" or "stderr") of a log chunk.
LOG_STREAM_HEADER = "Gpuplane-Log-Stream"


def stream_configs(replicas: int = 1) -> list[StreamConfig]:
    """The three streams; replicas is 1 in dev and 3 on a production cluster."""
    return [
        StreamConfig(
            name=DISPATCH_STREAM,
            subjects=["gpuplane.dispatch.*"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=DEDUP_WINDOW_SECONDS,
        ),
        StreamConfig(
            name=EVENTS_STREAM,
            # gpuplane.events.<host>.<job>; `>` also keeps the host-less subjects of earlier
            # releases, so a stream updated in place loses nothing in flight.
            subjects=[EVENTS_SUBJECTS],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=DEDUP_WINDOW_SECONDS,
        ),
        StreamConfig(
            name=LOGS_STREAM,
            subjects=["gpuplane.logs.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=24 * 3600.0,
            max_bytes=1 << 30,
            discard=DiscardPolicy.OLD,
        ),
    ]


async def ensure_streams(js: object, replicas: int = 1) -> None:
    """Creates the streams or brings their config up to date (idempotent)."""
    from nats.js.errors import NotFoundError

    for config in stream_configs(replicas):
        try:
            await js.stream_info(config.name)  # type: ignore[attr-defined]
            await js.update_stream(config)  # type: ignore[attr-defined]
        except NotFoundError:
            await js.add_stream(config)  # type: ignore[attr-defined]
