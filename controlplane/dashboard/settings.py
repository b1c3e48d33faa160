"""Dashboard settings (GPUPLANE_DASHBOARD_*), mixed into the control plane's Settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings

# The checkout's built app (scripts/bootstrap runs its npm build).
DEFAULT_APP_DIR = Path(__file__).resolve().parents[2] / "web" / "dist"


@dataclass(frozen=True, slots=True)
class DashboardSettings:
    """The dashboard's HTTP server and its browser sessions."""

    address: str  # host:port; empty = no dashboard
    app_dir: Path
    session_idle_seconds: float
    session_max_seconds: float

    @property
    def session_lifetimes(self) -> tuple[float, float]:
        """(idle, absolute) lifetime of a browser session, in seconds: BrowserSessions'."""
        return self.session_idle_seconds, self.session_max_seconds


class DashboardFields(BaseSettings):
    """The dashboard's fields of Settings (controlplane/dashboard)."""

    dashboard_address: str = Field(
        default="",
        description="host:port the web dashboard (and the browser API: login, gRPC-Web) is "
        "served on; port 0 picks one; empty = no dashboard. Bind loopback unless a reverse "
        "proxy or TLS (tls_cert_file, also used here) fronts it.",
    )
    dashboard_dir: Path | None = Field(
        default=None,
        description="The built dashboard app (index.html and assets); unset = web/dist of "
        "the checkout, which scripts/bootstrap builds.",
    )
    dashboard_session_idle_seconds: float = Field(
        default=8 * 3600,
        gt=0,
        description="A browser session unused for this long ends (log in again).",
    )
    dashboard_session_max_seconds: float = Field(
        default=7 * 24 * 3600,
        gt=0,
        description="A browser session ends this long after login, however much it is used "
        "(and when its API key expires or is revoked, at once).",
    )

    @field_validator("dashboard_address")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        value = value.strip()
        _, colon, port = value.rpartition(":")
        if value and (not colon or not port.isdigit() or int(port) > 65535):
            raise ValueError(f"must be host:port (e.g. 127.0.0.1:8080), not {value!r}")
        return value

    @property
    def dashboard(self) -> DashboardSettings:
        return DashboardSettings(
            address=self.dashboard_address,
            app_dir=self.dashboard_dir or DEFAULT_APP_DIR,
            session_idle_seconds=self.dashboard_session_idle_seconds,
            session_max_seconds=self.dashboard_session_max_seconds,
        )
