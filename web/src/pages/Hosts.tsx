// A provider's hosts (an admin's: every host), with state, GPUs and health.
import { useState } from "react";
import { registry, describe, type Role } from "../api";
import type { Host } from "../gen/gpuplane/v1/types_pb";
import { credits, hostStateName, shortId, when } from "../format";
import { useRefresh } from "../live";
import { NewToken } from "../components/NewToken";

export function HostBadge({ host }: { host: Host }) {
  const name = hostStateName(host.state);
  return <span className={`badge host-${name.toLowerCase()}`}>{name}</span>;
}

export function healthOf(host: Host): string {
  const sick = host.gpus.filter((g) => !g.healthy);
  return sick.length ? `${sick.length} GPU(s) unhealthy: ${sick.map((g) => g.unhealthyReason).join("; ")}` : "healthy";
}

export function HostsPage({ role }: { role: Role }) {
  const [hosts, setHosts] = useState<Host[]>([]);
  const [error, setError] = useState("");
  useRefresh(
    async () => {
      try {
        setHosts((await registry.listHosts({ pageSize: 100 })).hosts);
        setError("");
      } catch (failure) {
        setError(describe(failure));
      }
    },
    10_000,
    [],
  );
  return (
    <section>
      <h1>Hosts</h1>
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
      <div className="table-wrap">
        <table>
          <thead>
            <tr>
              <th scope="col">Host</th>
              <th scope="col">State</th>
              <th scope="col">GPUs</th>
              <th scope="col">Health</th>
              <th scope="col">Price / GPU-hour</th>
              <th scope="col">Jobs</th>
              <th scope="col">Last heartbeat</th>
            </tr>
          </thead>
          <tbody>
            {hosts.map((h) => (
              <tr key={h.hostId} data-host-id={h.hostId}>
                <td>
                  <a href={`#/hosts/${encodeURIComponent(h.hostId)}`} title={h.hostId}>
                    {h.hostname || shortId(h.hostId)}
                  </a>
                  {h.simulated && <span className="tag">simulated</span>}
                </td>
                <td>
                  <HostBadge host={h} />
                </td>
                <td>
                  {h.gpus.length} × {h.gpus[0]?.name ?? "—"}
                </td>
                <td>{healthOf(h)}</td>
                <td>{credits(h.pricePerGpuHourMicroCredits)}</td>
                <td>{h.jobIds.length}</td>
                <td>{when(h.lastHeartbeatAt)}</td>
              </tr>
            ))}
            {hosts.length === 0 && (
              <tr>
                <td colSpan={7}>No hosts yet: register one with a token (below).</td>
              </tr>
            )}
          </tbody>
        </table>
      </div>
      <NewToken forProvider={role === "provider"} />
    </section>
  );
}
