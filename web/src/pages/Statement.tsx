// The ledger statement: balances, then every entry on the tenant's accounts, newest first.
import { useState } from "react";
import { ledger, describe, type Session } from "../api";
import type { Balance, LedgerEntry } from "../gen/gpuplane/v1/types_pb";
import { AccountKind, TransferKind } from "../gen/gpuplane/v1/types_pb";
import { credits, shortId, when } from "../format";
import { useRefresh } from "../live";

function name(value: string | undefined, prefix: string): string {
  return (value ?? "").replace(prefix, "").toLowerCase().replace(/_/g, " ");
}

export function StatementPage({ session }: { session: Session }) {
  const [balance, setBalance] = useState<Balance | null>(null);
  const [entries, setEntries] = useState<LedgerEntry[]>([]);
  const [next, setNext] = useState("");
  const [error, setError] = useState("");

  async function page(token: string) {
    const reply = await ledger.listEntries({ pageSize: 50, pageToken: token });
    setEntries((old) => (token ? [...old, ...reply.entries] : reply.entries));
    setNext(reply.nextPageToken);
  }

  useRefresh(
    async () => {
      try {
        setBalance((await ledger.getBalance({})).balance ?? null);
        await page("");
      } catch (failure) {
        setError(describe(failure));
      }
    },
    15_000,
    [],
  );

  return (
    <section>
      <h1>Statement</h1>
      <p className="muted">Tenant {session.tenantId}</p>
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
      {balance && (
        <dl className="facts balances" data-testid="balance">
          <dt>Available</dt>
          <dd>{credits(balance.availableMicroCredits)}</dd>
          <dt>Held</dt>
          <dd>{credits(balance.heldMicroCredits)}</dd>
          <dt>Earnings</dt>
          <dd>{credits(balance.earningsMicroCredits)}</dd>
        </dl>
      )}
      <div className="table-wrap">
        <table data-testid="statement">
          <caption className="visually-hidden">Ledger entries, newest first</caption>
          <thead>
            <tr>
              <th scope="col">When</th>
              <th scope="col">Kind</th>
              <th scope="col" className="wide-only">Account</th>
              <th scope="col">Job</th>
              <th scope="col" className="num">
                Amount
              </th>
              <th scope="col" className="num wide-only">
                Balance after
              </th>
            </tr>
          </thead>
          <tbody>
            {entries.map((e, i) => (
              <tr key={`${e.transferId}-${e.accountId}-${i}`} data-kind={name(TransferKind[e.kind], "TRANSFER_KIND_")} data-job-id={e.jobId}>
                <td>{when(e.createdAt)}</td>
                <td>{name(TransferKind[e.kind], "TRANSFER_KIND_")}</td>
                <td className="wide-only">{name(AccountKind[e.accountKind], "ACCOUNT_KIND_")}</td>
                <td>{e.jobId ? <a href={`#/jobs/${encodeURIComponent(e.jobId)}`}>{shortId(e.jobId)}</a> : e.reference}</td>
                <td className="num">{credits(e.amountMicroCredits)}</td>
                <td className="num wide-only">{credits(e.balanceAfterMicroCredits)}</td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      {next && (
        <button type="button" className="secondary" onClick={() => page(next).catch((f) => setError(describe(f)))}>
          More
        </button>
      )}
    </section>
  );
}
