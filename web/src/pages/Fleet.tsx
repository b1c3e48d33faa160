// The operator's overview: hosts by state, GPUs, queue depth and running jobs, the ledger
// check; scheduler cycle time and outbox lag are on the control plane's /metrics.
import { useState } from "react";
import { jobs, ledger, registry, describe } from "../api";
import type { Host } from "../gen/gpuplane/v1/types_pb";
import { HostState, JobState } from "../gen/gpuplane/v1/types_pb";
import { hostStateName } from "../format";
import { Bars } from "../components/Bars";
import { useRefresh } from "../live";

interface Overview {
  hosts: Host[];
  queued: string;
  running: string;
  ledgerOk: boolean | null;
}

async function count(states: JobState[]): Promise<string> {
  const reply = await jobs.listJobs({ states, pageSize: 500 });
  return `${reply.jobs.length}${reply.nextPageToken ? "+" : ""}`;
}

export function FleetPage() {
  const [view, setView] = useState<Overview | null>(null);
  const [error, setError] = useState("");
  useRefresh(
    async () => {
      try {
        const [hosts, queued, running, check] = await Promise.all([
          registry.listHosts({ pageSize: 500 }),
          count([JobState.QUEUED]),
          count([JobState.SCHEDULED, JobState.STARTING, JobState.RUNNING, JobState.UPLOADING]),
          ledger.checkLedger({}).catch(() => null),
        ]);
        setView({ hosts: hosts.hosts, queued, running, ledgerOk: check ? check.consistent : null });
        setError("");
      } catch (failure) {
        setError(describe(failure));
      }
    },
    10_000,
    [],
  );
  if (!view) return <p role={error ? "alert" : undefined}>{error || "Loading…"}</p>;
  const byState = new Map<string, number>();
  for (const h of view.hosts) byState.set(hostStateName(h.state), (byState.get(hostStateName(h.state)) ?? 0) + 1);
  const gpus = view.hosts.filter((h) => h.state === HostState.ONLINE).flatMap((h) => h.gpus);
  const busy = gpus.filter((g) => g.jobId).length;
  const unhealthy = view.hosts.flatMap((h) => h.gpus).filter((g) => !g.healthy).length;
  return (
    <section>
      <h1>Fleet</h1>
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
      <dl className="tiles" data-testid="fleet">
        <div>
          <dt>Hosts</dt>
          <dd>{view.hosts.length}</dd>
        </div>
        <div>
          <dt>GPUs online (busy)</dt>
          <dd>
            {gpus.length} ({busy})
          </dd>
        </div>
        <div>
          <dt>Unhealthy GPUs</dt>
          <dd>{unhealthy}</dd>
        </div>
        <div>
          <dt>Queue depth</dt>
          <dd data-testid="queue-depth">{view.queued}</dd>
        </div>
        <div>
          <dt>Jobs placed or running</dt>
          <dd>{view.running}</dd>
        </div>
        <div>
          <dt>Ledger</dt>
          <dd>{view.ledgerOk === null ? "?" : view.ledgerOk ? "balanced" : "MISMATCH"}</dd>
        </div>
      </dl>
      <Bars title="Hosts by state" rows={[...byState.entries()].sort()} />
      <p className="muted">
        Scheduler cycle time and outbox lag are on the control plane's Prometheus endpoint: gpuplane_scheduler_cycle_seconds, gpuplane_outbox_oldest_unpublished_seconds.
      </p>
      <p>
        <a href="#/hosts">All hosts →</a>
      </p>
    </section>
  );
}
