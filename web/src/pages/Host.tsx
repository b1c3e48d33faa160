// One host: facts, drain/undrain, and per-GPU charts of utilisation, memory, temperature
// and power from the telemetry the control plane keeps (Gpu.recent), refreshed every 2 s:
// the contract has no telemetry stream.
import { useState } from "react";
import { registry, describe } from "../api";
import type { Gpu, Host } from "../gen/gpuplane/v1/types_pb";
import { HostState } from "../gen/gpuplane/v1/types_pb";
import { bytes, credits, seconds, when } from "../format";
import { Chart } from "../components/Chart";
import { HostBadge, healthOf } from "./Hosts";
import { useRefresh } from "../live";

function GpuCharts({ gpu }: { gpu: Gpu }) {
  const samples = gpu.recent.length ? gpu.recent : gpu.latest ? [gpu.latest] : [];
  const at = (f: (s: (typeof samples)[number]) => number): Array<[number, number]> =>
    samples.map((s) => [seconds(s.time), f(s)]);
  const memory = Number(gpu.memoryTotalBytes) / 2 ** 30;
  return (
    <section className="gpu" data-gpu={gpu.uuid} aria-label={`GPU ${gpu.index}`}>
      <h3>
        GPU {gpu.index}: {gpu.name}{" "}
        <span className={gpu.healthy ? "ok" : "error"}>{gpu.healthy ? "healthy" : gpu.unhealthyReason}</span>
      </h3>
      <p className="muted">
        {bytes(gpu.memoryTotalBytes)} · compute {gpu.computeCapability} · {gpu.jobId ? `running ${gpu.jobId}` : "idle"}
      </p>
      <div className="charts">
        <Chart
          title="Utilisation"
          testId="chart-utilisation"
          series={[{ label: "GPU", unit: "%", color: "#2563eb", max: 100, points: at((s) => s.utilizationGpuPercent) }]}
        />
        <Chart
          title="Memory used"
          testId="chart-memory"
          series={[
            {
              label: "memory",
              unit: "GiB",
              color: "#7c3aed",
              max: memory || undefined,
              points: at((s) => Number(s.memoryUsedBytes) / 2 ** 30),
            },
          ]}
        />
        <Chart
          title="Temperature"
          testId="chart-temperature"
          series={[{ label: "temperature", unit: "°C", color: "#c2410c", max: 100, points: at((s) => s.temperatureCelsius) }]}
        />
        <Chart
          title="Power"
          testId="chart-power"
          series={[
            {
              label: "power",
              unit: "W",
              color: "#15803d",
              max: gpu.powerLimitMilliwatts ? gpu.powerLimitMilliwatts / 1000 : undefined,
              points: at((s) => s.powerDrawMilliwatts / 1000),
            },
          ]}
        />
      </div>
    </section>
  );
}

export function HostPage({ hostId }: { hostId: string }) {
  const [host, setHost] = useState<Host | null>(null);
  const [error, setError] = useState("");
  const [reason, setReason] = useState("");
  const [busy, setBusy] = useState(false);
  async function load() {
    try {
      setHost((await registry.getHost({ hostId })).host ?? null);
      setError("");
    } catch (failure) {
      setError(describe(failure));
    }
  }
  useRefresh(load, 2000, [hostId]);

  async function act(drain: boolean) {
    setBusy(true);
    try {
      const reply = drain
        ? await registry.drainHost({ hostId, reason: reason || "drained from the dashboard" })
        : await registry.undrainHost({ hostId });
      if (reply.host) setHost(reply.host);
    } catch (failure) {
      setError(describe(failure));
    } finally {
      setBusy(false);
    }
  }

  if (!host) return <p role={error ? "alert" : undefined}>{error || "Loading…"}</p>;
  const draining = host.state === HostState.DRAINING || host.state === HostState.DRAINED;
  return (
    <article>
      <header className="page-head">
        <h1>
          Host <code>{host.hostname || host.hostId}</code>
        </h1>
        <HostBadge host={host} />
      </header>
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
      <dl className="facts">
        <dt>Id</dt>
        <dd>{host.hostId}</dd>
        <dt>Health</dt>
        <dd>{healthOf(host)}</dd>
        <dt>Provider</dt>
        <dd>{host.providerTenantId}</dd>
        <dt>Price</dt>
        <dd>{credits(host.pricePerGpuHourMicroCredits)} per GPU-hour</dd>
        <dt>Location</dt>
        <dd>{host.location || "—"}</dd>
        <dt>Driver</dt>
        <dd>
          {host.driverVersion} (CUDA {host.cudaDriverVersion}){host.simulated ? " · simulated" : ""}
        </dd>
        <dt>Verified</dt>
        <dd>{host.verified ? "yes" : `no${host.verificationReason ? ": " + host.verificationReason : ""}`}</dd>
        <dt>Last heartbeat</dt>
        <dd>{when(host.lastHeartbeatAt)}</dd>
        <dt>Jobs</dt>
        <dd>{host.jobIds.join(", ") || "none"}</dd>
        {host.drainReason && (
          <>
            <dt>Drain reason</dt>
            <dd>{host.drainReason}</dd>
          </>
        )}
      </dl>
      <div className="actions">
        {draining ? (
          <button type="button" onClick={() => act(false)} disabled={busy}>
            Undrain host
          </button>
        ) : (
          <>
            <label>
              Drain reason
              <input value={reason} onChange={(e) => setReason(e.target.value)} placeholder="maintenance" />
            </label>
            <button type="button" className="danger" onClick={() => act(true)} disabled={busy}>
              Drain host
            </button>
          </>
        )}
      </div>
      <h2>GPUs</h2>
      {host.gpus.map((g) => (
        <GpuCharts key={g.uuid} gpu={g} />
      ))}
    </article>
  );
}
