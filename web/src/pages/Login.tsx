// The API key form: a key is exchanged for an HttpOnly session cookie and forgotten.
import { useState, type FormEvent } from "react";
import { login, type Session } from "../api";

export function Login({ notice, onLogin }: { notice: string; onLogin: (s: Session) => void }) {
  const [key, setKey] = useState("");
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);

  async function submit(event: FormEvent) {
    event.preventDefault();
    setBusy(true);
    setError("");
    try {
      const session = await login(key.trim());
      setKey("");
      onLogin(session);
    } catch (failure) {
      setError(failure instanceof Error ? failure.message : String(failure));
    } finally {
      setBusy(false);
    }
  }

  return (
    <main className="login">
      <h1>gpuplane</h1>
      {notice && (
        <p className="notice" role="status">
          {notice}
        </p>
      )}
      <form onSubmit={submit} aria-label="Log in">
        <label htmlFor="api-key">API key</label>
        <input
          id="api-key"
          name="api-key"
          type="password"
          autoComplete="off"
          autoFocus
          required
          value={key}
          onChange={(e) => setKey(e.target.value)}
          aria-describedby={error ? "login-error" : undefined}
          aria-invalid={error ? true : undefined}
        />
        <button type="submit" disabled={busy || !key.trim()}>
          {busy ? "Logging in…" : "Log in"}
        </button>
        {error && (
          <p id="login-error" className="error" role="alert">
            {error}
          </p>
        )}
      </form>
      <p className="hint">The key is sent once and kept by no page: the browser holds a session cookie.</p>
    </main>
  );
}
