// Usage by day and by GPU model (GetUsage): GPU hours and cost; an admin sees all tenants.
import { useState } from "react";
import { ledger, describe, type Session } from "../api";
import type { UsageRow } from "../gen/gpuplane/v1/ledger_pb";
import { UsageGrouping } from "../gen/gpuplane/v1/ledger_pb";
import { Bars } from "../components/Bars";
import { credits, duration } from "../format";
import { useRefresh } from "../live";

export function UsagePage({ session }: { session: Session }) {
  const [byDay, setByDay] = useState<UsageRow[]>([]);
  const [byModel, setByModel] = useState<UsageRow[]>([]);
  const [error, setError] = useState("");
  const allTenants = session.role === "admin";
  useRefresh(
    async () => {
      try {
        const [day, model] = await Promise.all([
          ledger.getUsage({ groupBy: UsageGrouping.DAY, allTenants, pageSize: 60 }),
          ledger.getUsage({ groupBy: UsageGrouping.GPU_MODEL, allTenants, pageSize: 60 }),
        ]);
        setByDay(day.rows);
        setByModel(model.rows);
      } catch (failure) {
        setError(describe(failure));
      }
    },
    60_000,
    [],
  );
  const day = (r: UsageRow) =>
    r.periodStart ? new Date(Number(r.periodStart.seconds) * 1000).toISOString().slice(0, 10) : "?";
  return (
    <section>
      <h1>Usage</h1>
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
      <div className="two">
        <Bars title="GPU time by day" show={duration} rows={byDay.map((r) => [day(r), Number(r.gpuTimeMs)])} />
        <Bars title="Cost by day" show={credits} rows={byDay.map((r) => [day(r), Number(r.costMicroCredits)])} />
        <Bars
          title="GPU time by GPU model"
          show={duration}
          rows={byModel.map((r) => [r.gpuModel || "CPU only", Number(r.gpuTimeMs)])}
        />
        <Bars
          title="Cost by GPU model"
          show={credits}
          rows={byModel.map((r) => [r.gpuModel || "CPU only", Number(r.costMicroCredits)])}
        />
      </div>
    </section>
  );
}
