// A provider's (or an operator's, for a provider) new host registration token.
import { useState, type FormEvent } from "react";
import { admin, describe } from "../api";
import { Secret } from "./Secret";

export function NewToken({ forProvider }: { forProvider: boolean }) {
  const [label, setLabel] = useState("");
  const [provider, setProvider] = useState("");
  const [maxUses, setMaxUses] = useState("1");
  const [secret, setSecret] = useState("");
  const [error, setError] = useState("");

  async function create(event: FormEvent) {
    event.preventDefault();
    setError("");
    if (!/^\d+$/.test(maxUses.trim())) {
      setError("Max uses: a whole number (0: unlimited).");
      return;
    }
    try {
      const reply = await admin.createRegistrationToken({
        providerTenantId: forProvider ? "" : provider.trim(),
        label: label.trim(),
        maxUses: Number(maxUses),
      });
      setSecret(reply.secret);
    } catch (failure) {
      setError(describe(failure));
    }
  }

  return (
    <section aria-labelledby="new-token-h">
      <h2 id="new-token-h">Add a host</h2>
      <form className="inline-form" onSubmit={create} aria-label="New registration token">
        {!forProvider && (
          <label>
            Provider tenant
            <input value={provider} onChange={(e) => setProvider(e.target.value)} required />
          </label>
        )}
        <label>
          Token label
          <input value={label} onChange={(e) => setLabel(e.target.value)} placeholder="rack 7" />
        </label>
        <label>
          Max uses
          <input inputMode="numeric" value={maxUses} onChange={(e) => setMaxUses(e.target.value)} />
        </label>
        <button type="submit">New registration token</button>
      </form>
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
      {secret && (
        <Secret
          title="Registration token created."
          secret={secret}
          usage={`gpuplane daemon run --control-plane HOST:PORT --token ${secret}`}
        />
      )}
    </section>
  );
}
