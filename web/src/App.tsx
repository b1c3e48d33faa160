// The shell: login or the pages of the caller's role, with a navigation bar and logout.
import { useEffect, useState } from "react";
import { currentSession, logout, onSessionExpired, type Role, type Session } from "./api";
import { Login } from "./pages/Login";
import { currentPath, navigate, usePath } from "./router";
import { JobsPage } from "./pages/Jobs";
import { JobPage } from "./pages/Job";
import { SubmitPage } from "./pages/Submit";
import { StatementPage } from "./pages/Statement";
import { HostsPage } from "./pages/Hosts";
import { HostPage } from "./pages/Host";
import { EarningsPage } from "./pages/Earnings";
import { FleetPage } from "./pages/Fleet";
import { OffersPage } from "./pages/Offers";
import { UsagePage } from "./pages/Usage";
import { TenantsPage } from "./pages/Tenants";

interface Link {
  path: string;
  label: string;
  roles: Role[];
}

const LINKS: Link[] = [
  { path: "/fleet", label: "Fleet", roles: ["admin"] },
  { path: "/jobs", label: "Jobs", roles: ["consumer", "admin"] },
  { path: "/submit", label: "Submit", roles: ["consumer", "admin"] },
  { path: "/offers", label: "Offers", roles: ["consumer", "provider", "admin"] },
  { path: "/statement", label: "Statement", roles: ["consumer", "provider", "admin"] },
  { path: "/usage", label: "Usage", roles: ["consumer", "provider", "admin"] },
  { path: "/hosts", label: "Hosts", roles: ["provider", "admin"] },
  { path: "/earnings", label: "Earnings", roles: ["provider"] },
  { path: "/tenants", label: "Tenants & keys", roles: ["admin"] },
];

function home(role: Role): string {
  return role === "provider" ? "/hosts" : role === "admin" ? "/fleet" : "/jobs";
}

function Page({ path, session }: { path: string; session: Session }) {
  const [, section, id] = path.split("/");
  switch (section) {
    case "jobs":
      // keyed: another job's page starts afresh (its events, streams and chart)
      return id ? <JobPage key={id} jobId={decodeURIComponent(id)} /> : <JobsPage />;
    case "submit":
      return <SubmitPage />;
    case "statement":
      return <StatementPage session={session} />;
    case "usage":
      return <UsagePage session={session} />;
    case "hosts":
      return id ? <HostPage key={id} hostId={decodeURIComponent(id)} /> : <HostsPage role={session.role} />;
    case "earnings":
      return <EarningsPage />;
    case "fleet":
      return <FleetPage />;
    case "offers":
      return <OffersPage />;
    case "tenants":
      return <TenantsPage />;
    default:
      return <p>Nothing here. Pick a page above.</p>;
  }
}

export function App() {
  const path = usePath();
  const [session, setSession] = useState<Session | null | undefined>(undefined);
  const [notice, setNotice] = useState("");

  useEffect(() => {
    currentSession()
      .then(setSession)
      .catch(() => setSession(null));
    return onSessionExpired(() => {
      setSession(null);
      setNotice("Your session has expired: log in again. Unsent forms are kept.");
    });
  }, []);

  useEffect(() => {
    // The location, not `path`: it may have moved on since this render (a link, a test).
    const now = currentPath();
    if (session && (now === "/" || now === "/login")) navigate(home(session.role));
  }, [session, path]);

  if (session === undefined) return <p className="loading">Loading…</p>;
  if (session === null) {
    return (
      <Login
        notice={notice}
        onLogin={(s) => {
          setNotice("");
          setSession(s);
        }}
      />
    );
  }
  const links = LINKS.filter((l) => l.roles.includes(session.role));
  return (
    <>
      <a className="skip" href="#main" onClick={(e) => {
        e.preventDefault();
        document.getElementById("main")?.focus();
      }}>
        Skip to content
      </a>
      <header className="topbar">
        <a className="brand" href={`#${home(session.role)}`}>
          gpuplane
        </a>
        <nav aria-label="Main">
          {links.map((l) => (
            <a key={l.path} href={`#${l.path}`} aria-current={path.startsWith(l.path) ? "page" : undefined}>
              {l.label}
            </a>
          ))}
        </nav>
        <span className="who" data-testid="who">
          {session.tenantId} · {session.role}
        </span>
        <button
          type="button"
          className="secondary"
          onClick={async () => {
            await logout().catch(() => undefined);
            setNotice("You are logged out.");
            setSession(null);
          }}
        >
          Log out
        </button>
      </header>
      <main id="main" tabIndex={-1}>
        <Page path={path} session={session} />
      </main>
    </>
  );
}
