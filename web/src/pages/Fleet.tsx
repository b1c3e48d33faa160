// The operator's overview: hosts and jobs by state, queue depth, the scheduler's cycle time,
// outbox lag and unacknowledged commands (AdminService.GetFleetStatus), GPUs and the ledger
// check; refreshed every 5 s while the page is open and visible.
import { useState } from "react";
import { admin, ledger, registry, describe } from "../api";
import type { GetFleetStatusResponse } from "../gen/gpuplane/v1/admin_pb";
import type { Host } from "../gen/gpuplane/v1/types_pb";
import { HostState, JobState } from "../gen/gpuplane/v1/types_pb";
import { age, cycleTime, hostStateName, when } from "../format";
import { Bars } from "../components/Bars";
import { useRefresh } from "../live";

const PLACED_OR_RUNNING: ReadonlySet<JobState> = new Set([
  JobState.SCHEDULED,
  JobState.STARTING,
  JobState.RUNNING,
  JobState.UPLOADING,
]);

interface Overview {
  status: GetFleetStatusResponse;
  hosts: Host[];
  ledgerOk: boolean | null;
}

function Tile({ label, value, testId }: { label: string; value: string; testId?: string }) {
  return (
    <div>
      <dt>{label}</dt>
      <dd data-testid={testId}>{value}</dd>
    </div>
  );
}

function Scheduler({ status }: { status: GetFleetStatusResponse }) {
  const cycles = status.scheduler;
  const ran = cycles !== undefined && cycles.cyclesInWindow > 0 ? cycles : null;
  return (
    <section aria-labelledby="scheduler-heading">
      <h2 id="scheduler-heading">Scheduler</h2>
      <p className="muted" data-testid="scheduler-where">
        {status.schedulerLeaderHere
          ? "Measured on the leading replica."
          : "This replica is not leading: see gpuplane_scheduler_cycle_seconds on the leader."}
      </p>
      <dl className="tiles">
        <Tile label="Last cycle" value={ran ? cycleTime(ran.lastCycleSeconds) : "—"} testId="cycle-time" />
        <Tile
          label={`p50 / p99 (last ${cycles?.cyclesInWindow ?? 0})`}
          value={ran ? `${cycleTime(ran.p50Seconds)} / ${cycleTime(ran.p99Seconds)}` : "—"}
        />
        <Tile
          label="Last cycle placed / considered"
          value={ran ? `${ran.lastPlaced} / ${ran.lastConsidered}` : "—"}
        />
        <Tile label="Last cycle at" value={ran ? when(ran.lastCycleAt) : "—"} />
      </dl>
    </section>
  );
}

export function FleetPage() {
  const [view, setView] = useState<Overview | null>(null);
  const [error, setError] = useState("");
  useRefresh(
    async () => {
      if (document.hidden) return; // a background tab asks nothing until shown again
      try {
        const [status, hosts, check] = await Promise.all([
          admin.getFleetStatus({}),
          registry.listHosts({ pageSize: 500 }),
          ledger.checkLedger({}).catch(() => null),
        ]);
        setView({ status, hosts: hosts.hosts, ledgerOk: check ? check.consistent : null });
        setError("");
      } catch (failure) {
        setError(describe(failure));
      }
    },
    5_000,
    [],
  );
  if (!view) return <p role={error ? "alert" : undefined}>{error || "Loading…"}</p>;
  const { status } = view;
  const hostRows: Array<[string, number]> = status.hosts.map((c) => [hostStateName(c.state), Number(c.count)]);
  const hostCount = hostRows.reduce((sum, [, n]) => sum + n, 0);
  const placed = status.jobs.filter((c) => PLACED_OR_RUNNING.has(c.state)).reduce((sum, c) => sum + Number(c.count), 0);
  const gpus = view.hosts.filter((h) => h.state === HostState.ONLINE).flatMap((h) => h.gpus);
  const busy = gpus.filter((g) => g.jobId).length;
  const unhealthy = view.hosts.flatMap((h) => h.gpus).filter((g) => !g.healthy).length;
  const outboxLag = age(status.outboxOldestSeconds);
  return (
    <section>
      <h1>Fleet</h1>
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
      <dl className="tiles" data-testid="fleet">
        <Tile label="Hosts" value={String(hostCount)} />
        <Tile label="GPUs online (busy)" value={`${gpus.length} (${busy})`} />
        <Tile label="Unhealthy GPUs" value={String(unhealthy)} />
        <Tile label="Queue depth" value={String(status.queueDepth)} testId="queue-depth" />
        <Tile label="Jobs placed or running" value={String(placed)} />
        <Tile
          label="Outbox lag (unpublished)"
          value={`${outboxLag} (${status.outboxBacklog})`}
          testId="outbox-lag"
        />
        <Tile
          label="Commands not acknowledged (oldest)"
          value={`${status.commandsUnacked} (${age(status.commandsOldestSeconds)})`}
        />
        <Tile label="Ledger" value={view.ledgerOk === null ? "?" : view.ledgerOk ? "balanced" : "MISMATCH"} />
      </dl>
      <Scheduler status={status} />
      <Bars title="Hosts by state" rows={hostRows} />
      <p>
        <a href="#/hosts">All hosts →</a>
      </p>
    </section>
  );
}
