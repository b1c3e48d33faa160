// Hash routes ("#/jobs/job_123"): the control plane serves one index.html and nothing
// needs to know the dashboard's paths; reloading a page keeps it.
import { useEffect, useState } from "react";

export function currentPath(): string {
  return location.hash.replace(/^#/, "") || "/";
}

export function navigate(path: string): void {
  location.hash = path;
}

export function usePath(): string {
  const [path, setPath] = useState(currentPath());
  useEffect(() => {
    const update = () => setPath(currentPath());
    window.addEventListener("hashchange", update);
    return () => window.removeEventListener("hashchange", update);
  }, []);
  return path;
}
