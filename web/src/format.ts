// How numbers, money, states and times are shown.
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { AttemptState, HostState, JobState } from "./gen/gpuplane/v1/types_pb";

const MICRO = 1_000_000n;

/** Micro-credits as credits with up to 6 decimals, e.g. 1_500_000n → "1.5 cr". */
export function credits(micro: bigint | number): string {
  const value = BigInt(micro);
  const sign = value < 0n ? "−" : "";
  const magnitude = value < 0n ? -value : value;
  const whole = magnitude / MICRO;
  const fraction = (magnitude % MICRO).toString().padStart(6, "0").replace(/0+$/, "");
  return `${sign}${whole.toLocaleString("en")}${fraction ? "." + fraction : ""} cr`;
}

/** Credits typed by a person → micro-credits; null when not a number. */
export function parseCredits(text: string): bigint | null {
  const match = /^\s*(\d+)(?:\.(\d{0,6}))?\s*$/.exec(text);
  if (!match) return null;
  return BigInt(match[1]) * MICRO + BigInt((match[2] ?? "").padEnd(6, "0") || "0");
}

export function jobStateName(state: JobState): string {
  return (JobState[state] ?? "UNKNOWN").replace(/^JOB_STATE_/, "");
}

export function attemptStateName(state: AttemptState): string {
  return (AttemptState[state] ?? "UNKNOWN").replace(/^ATTEMPT_STATE_/, "");
}

export function hostStateName(state: HostState): string {
  return (HostState[state] ?? "UNKNOWN").replace(/^HOST_STATE_/, "");
}

export const TERMINAL_JOB_STATES: ReadonlySet<JobState> = new Set([
  JobState.SUCCEEDED,
  JobState.FAILED,
  JobState.CANCELLED,
  JobState.TIMED_OUT,
  JobState.REJECTED,
]);

/** A local date and time as "2026-12-06 22:37:13". */
export function localTime(date: Date): string {
  const pad = (n: number) => String(n).padStart(2, "0");
  return (
    `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
    `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`
  );
}

export function when(stamp: Timestamp | undefined): string {
  if (!stamp || (stamp.seconds === 0n && stamp.nanos === 0)) return "—";
  return localTime(timestampDate(stamp));
}

export function seconds(stamp: Timestamp | undefined): number {
  return stamp ? Number(stamp.seconds) + stamp.nanos / 1e9 : 0;
}

export function bytes(value: bigint | number): string {
  let n = Number(value);
  for (const unit of ["B", "KiB", "MiB", "GiB", "TiB"]) {
    if (n < 1024 || unit === "TiB") return `${n.toFixed(unit === "B" ? 0 : 1)} ${unit}`;
    n /= 1024;
  }
  return `${n} B`;
}

export function duration(ms: bigint | number): string {
  if (Number(ms) > 0 && Number(ms) < 1000) return `${Number(ms)} ms`;
  let s = Math.round(Number(ms) / 1000);
  const h = Math.floor(s / 3600);
  s -= h * 3600;
  const m = Math.floor(s / 60);
  s -= m * 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
}

export function shortId(id: string): string {
  const [prefix, rest] = id.includes("_") ? id.split(/_(.*)/s) : ["", id];
  return prefix ? `${prefix}_${rest.slice(0, 8)}` : id.slice(0, 8);
}

/** How long ago, humanised: "none" for 0 (nothing waiting), "0.4 s", "12s", "3m 5s", "2h 1m". */
export function age(seconds: number): string {
  if (seconds <= 0) return "none";
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  return duration(seconds * 1000);
}

/** A short duration measured in seconds, e.g. a scheduler cycle: "0.42 ms", "12.3 ms", "1.25 s". */
export function cycleTime(seconds: number): string {
  if (seconds < 0.001) return `${(seconds * 1000).toFixed(2)} ms`;
  if (seconds < 1) return `${(seconds * 1000).toFixed(1)} ms`;
  return `${seconds.toFixed(2)} s`;
}
