"""SubmitJob with dry_run: the spec checked and completed exactly as a submit would, then
quoted; nothing is stored and no credit is held."""

from __future__ import annotations

from typing import Protocol

from gpuplane.v1 import jobs_pb2, types_pb2

from controlplane.jobs.service import JobService


class Quotes(Protocol):
    """Prices a prepared spec on the scheduler's capacity index (the scheduler's Quoter)."""

    async def quote(self, spec: types_pb2.JobSpec) -> jobs_pb2.Quote: ...


class DryRun:
    def __init__(self, jobs: JobService, quoter: Quotes) -> None:
        self.jobs = jobs
        self.quoter = quoter

    async def quote(self, spec: types_pb2.JobSpec) -> jobs_pb2.Quote:
        """The quote of `spec` after the validation and defaults a submit applies."""
        return await self.quoter.quote(self.jobs.prepare_spec(spec))
