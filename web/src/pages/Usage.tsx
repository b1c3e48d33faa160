// Usage by day and by GPU model (GetUsage): GPU hours and cost; an admin sees all tenants.
import { useState } from "react";
import { ledger, describe, type Session } from "../api";
import type { UsageRow } from "../gen/gpuplane/v1/ledger_pb";
import { UsageGrouping } from "../gen/gpuplane/v1/ledger_pb";
import { Bars } from "../components/Bars";
import { useRefresh } from "../live";

const HOUR_MS = 3_600_000;

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
        <Bars title="GPU hours by day" unit="h" rows={byDay.map((r) => [day(r), Number(r.gpuTimeMs) / HOUR_MS])} />
        <Bars title="Cost by day" unit="cr" rows={byDay.map((r) => [day(r), Number(r.costMicroCredits) / 1e6])} />
        <Bars
          title="GPU hours by GPU model"
          unit="h"
          rows={byModel.map((r) => [r.gpuModel || "CPU only", Number(r.gpuTimeMs) / HOUR_MS])}
        />
        <Bars
          title="Cost by GPU model"
          unit="cr"
          rows={byModel.map((r) => [r.gpuModel || "CPU only", Number(r.costMicroCredits) / 1e6])}
        />
      </div>
    </section>
  );
}
