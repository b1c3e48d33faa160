"""The control plane's log format (GPUPLANE_LOG_FORMAT), mixed into its Settings."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings

from messaging.jsonlog import LogFormat


class LoggingFields(BaseSettings):
    """Beside log_level (settings.py, at its size limit): how each line is written."""

    log_format: LogFormat = Field(
        default="text",
        description="Log lines as text, or json: one JSON object per line (time, level, "
        "logger, message, and job_id/attempt/host_id where a line is about one).",
    )
