// The operator's tenants, API keys (metadata only) and registration tokens, with revoke.
import { useState, type FormEvent } from "react";
import { admin, describe } from "../api";
import type { ApiKey, RegistrationToken, Tenant } from "../gen/gpuplane/v1/types_pb";
import { Role } from "../gen/gpuplane/v1/types_pb";
import { when } from "../format";
import { useRefresh } from "../live";
import { Secret } from "../components/Secret";

export function TenantsPage() {
  const [tenants, setTenants] = useState<Tenant[]>([]);
  const [keys, setKeys] = useState<ApiKey[]>([]);
  const [tokens, setTokens] = useState<RegistrationToken[]>([]);
  const [error, setError] = useState("");
  async function load() {
    try {
      const [t, k, r] = await Promise.all([
        admin.listTenants({ pageSize: 200 }),
        admin.listApiKeys({ pageSize: 200, includeRevoked: true }),
        admin.listRegistrationTokens({ pageSize: 200, includeInactive: true }),
      ]);
      setTenants(t.tenants);
      setKeys(k.keys);
      setTokens(r.tokens);
      setError("");
    } catch (failure) {
      setError(describe(failure));
    }
  }
  useRefresh(load, 30_000, []);
  async function revoke(keyId: string) {
    if (!window.confirm(`Revoke key ${keyId}? Whoever uses it is locked out.`)) return;
    try {
      await admin.revokeApiKey({ keyId });
      await load();
    } catch (failure) {
      setError(describe(failure));
    }
  }
  const [tenantName, setTenantName] = useState("");
  const [keyFor, setKeyFor] = useState({ tenant: "", role: String(Role.CONSUMER), description: "" });
  const [secret, setSecret] = useState("");

  async function createTenant(event: FormEvent) {
    event.preventDefault();
    try {
      const reply = await admin.createTenant({ name: tenantName.trim() });
      setTenantName("");
      if (reply.tenant) setKeyFor({ ...keyFor, tenant: reply.tenant.tenantId });
      await load();
    } catch (failure) {
      setError(describe(failure));
    }
  }

  async function createKey(event: FormEvent) {
    event.preventDefault();
    try {
      const reply = await admin.createApiKey({
        tenantId: keyFor.tenant.trim(),
        role: Number(keyFor.role) as Role,
        description: keyFor.description.trim(),
      });
      setSecret(reply.secret);
      await load();
    } catch (failure) {
      setError(describe(failure));
    }
  }

  return (
    <section>
      <h1>Tenants</h1>
      <form className="inline-form" onSubmit={createTenant} aria-label="New tenant">
        <label>
          Tenant name
          <input value={tenantName} onChange={(e) => setTenantName(e.target.value)} required />
        </label>
        <button type="submit">Create tenant</button>
      </form>
      <form className="inline-form" onSubmit={createKey} aria-label="New API key">
        <label>
          Key for tenant
          <input value={keyFor.tenant} onChange={(e) => setKeyFor({ ...keyFor, tenant: e.target.value })} required />
        </label>
        <label>
          Role
          <select value={keyFor.role} onChange={(e) => setKeyFor({ ...keyFor, role: e.target.value })}>
            <option value={Role.CONSUMER}>consumer</option>
            <option value={Role.PROVIDER}>provider</option>
            <option value={Role.ADMIN}>admin</option>
          </select>
        </label>
        <label>
          Description
          <input value={keyFor.description} onChange={(e) => setKeyFor({ ...keyFor, description: e.target.value })} />
        </label>
        <button type="submit">Create API key</button>
      </form>
      {secret && <Secret title="API key created." secret={secret} usage="GPUPLANE_API_KEY=… or the dashboard's login" />}
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
      <div className="table-wrap">
        <table>
          <thead>
            <tr>
              <th scope="col">Tenant</th>
              <th scope="col">Name</th>
              <th scope="col">Created</th>
              <th scope="col">Fair share</th>
            </tr>
          </thead>
          <tbody>
            {tenants.map((t) => (
              <tr key={t.tenantId}>
                <td>{t.tenantId}</td>
                <td>{t.name}</td>
                <td>{when(t.createdAt)}</td>
                <td>{t.fairShareWeight || 1}</td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      <h2>API keys</h2>
      <div className="table-wrap">
        <table>
          <thead>
            <tr>
              <th scope="col">Key</th>
              <th scope="col">Tenant</th>
              <th scope="col">Role</th>
              <th scope="col">Description</th>
              <th scope="col">Last used</th>
              <th scope="col">Status</th>
            </tr>
          </thead>
          <tbody>
            {keys.map((k) => (
              <tr key={k.keyId}>
                <td>
                  <code>{k.prefix}…</code>
                </td>
                <td>{k.tenantId}</td>
                <td>{(Role[k.role] ?? "").replace("ROLE_", "").toLowerCase()}</td>
                <td>{k.description}</td>
                <td>{when(k.lastUsedAt)}</td>
                <td>
                  {k.revokedAt ? (
                    "revoked"
                  ) : (
                    <button type="button" className="secondary" onClick={() => revoke(k.keyId)}>
                      Revoke
                    </button>
                  )}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      <h2>Registration tokens</h2>
      <div className="table-wrap">
        <table>
          <thead>
            <tr>
              <th scope="col">Token</th>
              <th scope="col">Provider</th>
              <th scope="col">Label</th>
              <th scope="col">Uses</th>
              <th scope="col">Expires</th>
              <th scope="col">Status</th>
            </tr>
          </thead>
          <tbody>
            {tokens.map((t) => (
              <tr key={t.tokenId}>
                <td>{t.tokenId}</td>
                <td>{t.providerTenantId}</td>
                <td>{t.label}</td>
                <td>
                  {t.uses}
                  {t.maxUses ? ` / ${t.maxUses}` : ""}
                </td>
                <td>{when(t.expiresAt)}</td>
                <td>{t.revokedAt ? "revoked" : "active"}</td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
    </section>
  );
}
