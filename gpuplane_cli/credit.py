"""What `jobs submit` says when a job's hold exceeds the caller's credit: credits and flags."""

from __future__ import annotations

from gpuplane.v1 import jobs_pb2, types_pb2

from gpuplane_cli.units import format_credits

SECONDS_PER_HOUR = 3600


def duration_flag(seconds: int) -> str:
    """Seconds as a --max-duration value, whole minutes from a minute up: "1h30m", "45m"."""
    if seconds < 60:
        return f"{seconds}s"
    hours, minutes = divmod(seconds // 60, 60)
    if not hours:
        return f"{minutes}m"
    return f"{hours}h{minutes}m" if minutes else f"{hours}h"


def _hold_figure(quote: jobs_pb2.Quote, spec: types_pb2.JobSpec) -> str:
    """How the hold was reached, in the user's words (a sentence)."""
    if spec.budget_micro_credits:
        return "The hold is your --budget."
    price = format_credits(quote.hold_price_per_gpu_hour_micro_credits)
    if quote.matching_host_count:
        source = "the dearest offer matching the job now"
    elif spec.max_price_per_gpu_hour_micro_credits:
        source = "your --max-price, as no host matches the job now"
    else:
        source = "the pricing policy's ceiling, as no host matches the job now"
    gpus = f"{spec.gpu_count} GPU" + ("s" if spec.gpu_count != 1 else "")
    duration = duration_flag(int(spec.max_duration_seconds))
    return (
        f"The hold is --max-duration {duration} × {gpus} × {price} credits per GPU-hour, {source}."
    )


def _fixes(quote: jobs_pb2.Quote, spec: types_pb2.JobSpec) -> list[str]:
    """The flags that would make the hold fit the available credit."""
    available = quote.available_micro_credits
    price = quote.hold_price_per_gpu_hour_micro_credits
    if available <= 0:
        return []
    if spec.budget_micro_credits:
        return [f"--budget {format_credits(available)} or less"]
    fixes: list[str] = []
    if price and spec.gpu_count:
        fits = available * SECONDS_PER_HOUR // (price * spec.gpu_count)
        if fits >= 1:
            fixes.append(f"--max-duration {duration_flag(int(fits))}")
    if not quote.matching_host_count:
        lower = "a lower" if spec.max_price_per_gpu_hour_micro_credits else "a"
        fixes.append(f"{lower} --max-price (see `gpuplane offers`)")
    if spec.gpu_count > 1:
        fixes.append("fewer --gpus")
    fixes.append(f"--budget {format_credits(available)} (the job stops when it is spent)")
    return fixes


def shortfall(quote: jobs_pb2.Quote, spec: types_pb2.JobSpec) -> str | None:
    """Why submit is (or would be) refused for want of credit, and what fixes it; None when
    the available credit covers the hold."""
    if quote.hold_micro_credits <= quote.available_micro_credits:
        return None
    fixes = _fixes(quote, spec)
    fix = f"credits, or submit with {', or '.join(fixes)}." if fixes else "credits."
    return (
        f"insufficient credit: the job needs a hold of {format_credits(quote.hold_micro_credits)} "
        f"credits and you have {format_credits(quote.available_micro_credits)} available. "
        f"{_hold_figure(quote, spec)} Deposit more {fix}"
    )
