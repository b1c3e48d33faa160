// The browser's way to the control plane: the session endpoints (/auth/*) and gRPC-Web
// clients generated from proto/ (the same RPCs, authorisation and rate limits as gRPC).
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { AdminService } from "./gen/gpuplane/v1/admin_pb";
import { JobService } from "./gen/gpuplane/v1/jobs_pb";
import { LedgerService } from "./gen/gpuplane/v1/ledger_pb";
import { RegistryService } from "./gen/gpuplane/v1/registry_pb";

export type Role = "admin" | "consumer" | "provider" | "host" | "unknown";

export interface Session {
  tenantId: string;
  role: Role;
  keyId: string;
}

const transport = createGrpcWebTransport({
  baseUrl: location.origin,
  useBinaryFormat: true,
  // connect-web v2 has no `credentials` option: fetch's default, "same-origin", sends the
  // session cookie to the control plane (the page's own origin) and nowhere else.
  fetch: (input, init) => globalThis.fetch(input, { ...init, credentials: "same-origin" }),
});

export const jobs: Client<typeof JobService> = createClient(JobService, transport);
export const ledger: Client<typeof LedgerService> = createClient(LedgerService, transport);
export const registry: Client<typeof RegistryService> = createClient(RegistryService, transport);
export const admin: Client<typeof AdminService> = createClient(AdminService, transport);

// Every page reports an expired session here; the app then shows the login form.
type ExpiredListener = () => void;
const expiredListeners = new Set<ExpiredListener>();

export function onSessionExpired(listener: ExpiredListener): () => void {
  expiredListeners.add(listener);
  return () => expiredListeners.delete(listener);
}

/** Turns an RPC failure into a sentence, telling the app when the session is gone. */
export function describe(error: unknown): string {
  const failure = ConnectError.from(error);
  if (failure.code === Code.Unauthenticated) {
    expiredListeners.forEach((listener) => listener());
    return "Your session has expired: log in again.";
  }
  if (failure.code === Code.Unavailable) {
    return "The control plane is unreachable; retrying.";
  }
  return failure.rawMessage || failure.message;
}

/** Whether a stream that failed this way is worth opening again. */
export function retryable(error: unknown): boolean {
  const code = ConnectError.from(error).code;
  return ![
    Code.Unauthenticated,
    Code.PermissionDenied,
    Code.NotFound,
    Code.InvalidArgument,
    Code.Canceled,
  ].includes(code);
}

function normaliseRole(raw: unknown): Role {
  const text = String(raw ?? "").toLowerCase().replace(/^role_/, "");
  return (["admin", "consumer", "provider", "host"] as const).find((r) => r === text) ?? "unknown";
}

function sessionFrom(body: Record<string, unknown>): Session {
  return {
    tenantId: String(body.tenant_id ?? ""),
    role: normaliseRole(body.role),
    keyId: String(body.key_id ?? ""),
  };
}

const CSRF = { "x-gpuplane-csrf": "1" };

/** The current session, or null when there is none (or it expired). */
export async function currentSession(): Promise<Session | null> {
  const response = await fetch("/auth/session", { credentials: "same-origin" });
  if (response.status === 401) return null;
  if (!response.ok) throw new Error(`the control plane answered ${response.status}`);
  return sessionFrom(await response.json());
}

/** Exchanges an API key for a session cookie; throws with a message fit to show. */
export async function login(apiKey: string): Promise<Session> {
  let response: Response;
  try {
    response = await fetch("/auth/login", {
      method: "POST",
      credentials: "same-origin",
      headers: { "content-type": "application/json", ...CSRF },
      body: JSON.stringify({ api_key: apiKey }),
    });
  } catch {
    throw new Error("The control plane is unreachable. Try again in a moment.");
  }
  if (response.status === 401) throw new Error("Invalid API key.");
  if (response.status === 429) throw new Error("Too many attempts: wait a moment and retry.");
  if (!response.ok) throw new Error(`Login failed (HTTP ${response.status}).`);
  return sessionFrom(await response.json());
}

export async function logout(): Promise<void> {
  await fetch("/auth/logout", { method: "POST", credentials: "same-origin", headers: CSRF });
}
