// Offers for sale now (ListOffers), with the contract's filters.
import { useState, type FormEvent } from "react";
import { registry, describe } from "../api";
import type { Offer } from "../gen/gpuplane/v1/types_pb";
import { credits, parseCredits, shortId } from "../format";
import { useRefresh } from "../live";

export function OffersPage() {
  const [filter, setFilter] = useState({ gpuType: "", minVram: "", maxPrice: "", location: "", verified: false });
  const [applied, setApplied] = useState(filter);
  const [offers, setOffers] = useState<Offer[]>([]);
  const [error, setError] = useState("");
  useRefresh(
    async () => {
      try {
        const reply = await registry.listOffers({
          gpuType: applied.gpuType.trim(),
          minVramGib: Number(applied.minVram) || 0,
          maxPricePerGpuHourMicroCredits: parseCredits(applied.maxPrice) ?? 0n,
          location: applied.location.trim(),
          verifiedOnly: applied.verified,
          pageSize: 100,
        });
        setOffers(reply.offers);
        setError("");
      } catch (failure) {
        setError(describe(failure));
      }
    },
    15_000,
    [applied],
  );
  const submit = (event: FormEvent) => {
    event.preventDefault();
    setApplied({ ...filter });
  };
  return (
    <section>
      <h1>Offers</h1>
      <form className="filters" onSubmit={submit} aria-label="Filter offers">
        <label>
          GPU model
          <input value={filter.gpuType} onChange={(e) => setFilter({ ...filter, gpuType: e.target.value })} placeholder="h100" />
        </label>
        <label>
          Min VRAM (GiB)
          <input inputMode="numeric" value={filter.minVram} onChange={(e) => setFilter({ ...filter, minVram: e.target.value })} />
        </label>
        <label>
          Max price (credits)
          <input inputMode="decimal" value={filter.maxPrice} onChange={(e) => setFilter({ ...filter, maxPrice: e.target.value })} />
        </label>
        <label>
          Location
          <input value={filter.location} onChange={(e) => setFilter({ ...filter, location: e.target.value })} />
        </label>
        <label className="check">
          <input type="checkbox" checked={filter.verified} onChange={(e) => setFilter({ ...filter, verified: e.target.checked })} />
          Verified only
        </label>
        <button type="submit">Filter</button>
      </form>
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
              <th scope="col">GPU</th>
              <th scope="col">VRAM</th>
              <th scope="col">Free / total</th>
              <th scope="col">Price / GPU-hour</th>
              <th scope="col">Location</th>
              <th scope="col">Reliability</th>
            </tr>
          </thead>
          <tbody>
            {offers.map((o) => (
              <tr key={`${o.hostId}-${o.gpuModel}`}>
                <td title={o.hostId}>
                  {shortId(o.hostId)}
                  {o.simulated && <span className="tag">simulated</span>}
                  {o.verified && <span className="tag ok">verified</span>}
                </td>
                <td>{o.gpuModel}</td>
                <td>{o.vramGib} GiB</td>
                <td>
                  {o.freeGpuCount} / {o.totalGpuCount}
                </td>
                <td>{credits(o.pricePerGpuHourMicroCredits)}</td>
                <td>{o.location || "—"}</td>
                <td>{(o.reliabilityPermille / 10).toFixed(1)} %</td>
              </tr>
            ))}
            {offers.length === 0 && (
              <tr>
                <td colSpan={7}>No offers match.</td>
              </tr>
            )}
          </tbody>
        </table>
      </div>
    </section>
  );
}
