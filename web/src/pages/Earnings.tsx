// A provider's earnings balance and payouts, with a payout request.
import { useState, type FormEvent } from "react";
import { ledger, describe } from "../api";
import type { PayoutRecord } from "../gen/gpuplane/v1/ledger_pb";
import { PayoutState } from "../gen/gpuplane/v1/ledger_pb";
import type { Balance } from "../gen/gpuplane/v1/types_pb";
import { credits, parseCredits, when } from "../format";
import { useRefresh } from "../live";

export function EarningsPage() {
  const [balance, setBalance] = useState<Balance | null>(null);
  const [payouts, setPayouts] = useState<PayoutRecord[]>([]);
  const [amount, setAmount] = useState("");
  const [destination, setDestination] = useState("");
  const [message, setMessage] = useState("");
  async function load() {
    try {
      setBalance((await ledger.getBalance({})).balance ?? null);
      setPayouts((await ledger.listPayouts({ pageSize: 50 })).payouts);
    } catch (failure) {
      setMessage(describe(failure));
    }
  }
  useRefresh(load, 30_000, []);

  async function payout(event: FormEvent) {
    event.preventDefault();
    const micro = parseCredits(amount);
    if (micro === null || micro <= 0n) {
      setMessage("Amount: credits, e.g. 12.5");
      return;
    }
    try {
      await ledger.payout({ amountMicroCredits: micro, destination, idempotencyKey: `${Date.now()}-${micro}` });
      setMessage("Payout requested.");
      setAmount("");
      await load();
    } catch (failure) {
      setMessage(describe(failure));
    }
  }

  return (
    <section>
      <h1>Earnings</h1>
      {balance && (
        <p className="big" data-testid="earnings">
          {credits(balance.earningsMicroCredits)} earned, not yet paid out
        </p>
      )}
      <form className="filters" onSubmit={payout} aria-label="Request a payout">
        <label>
          Amount (credits)
          <input inputMode="decimal" value={amount} onChange={(e) => setAmount(e.target.value)} required />
        </label>
        <label>
          Destination
          <input value={destination} onChange={(e) => setDestination(e.target.value)} required placeholder="IBAN or account" />
        </label>
        <button type="submit">Request payout</button>
      </form>
      {message && <p role="status">{message}</p>}
      <h2>Payouts</h2>
      <div className="table-wrap">
        <table>
          <thead>
            <tr>
              <th scope="col">When</th>
              <th scope="col">Amount</th>
              <th scope="col">Destination</th>
              <th scope="col">State</th>
            </tr>
          </thead>
          <tbody>
            {payouts.map((p) => (
              <tr key={p.payoutId}>
                <td>{when(p.createdAt)}</td>
                <td>{credits(p.amountMicroCredits)}</td>
                <td>{p.destination}</td>
                <td>{(PayoutState[p.state] ?? "").replace("PAYOUT_STATE_", "").toLowerCase()}</td>
              </tr>
            ))}
            {payouts.length === 0 && (
              <tr>
                <td colSpan={4}>No payouts yet.</td>
              </tr>
            )}
          </tbody>
        </table>
      </div>
    </section>
  );
}
