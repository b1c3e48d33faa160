// The caller's jobs, newest first, filtered by state, label and id; unfinished jobs'
// states follow their WatchJob streams.
import { useEffect, useState, type FormEvent } from "react";
import { Code, ConnectError } from "@connectrpc/connect";
import { jobs, describe } from "../api";
import type { Job } from "../gen/gpuplane/v1/types_pb";
import { JobState } from "../gen/gpuplane/v1/types_pb";
import { credits, jobStateName, shortId, TERMINAL_JOB_STATES, when } from "../format";
import { useLiveStream, useRefresh } from "../live";

const STATES = Object.values(JobState).filter(
  (v): v is JobState => typeof v === "number" && v !== JobState.UNSPECIFIED,
);

function parseLabels(text: string): Record<string, string> | null {
  const labels: Record<string, string> = {};
  for (const part of text.split(",").map((p) => p.trim()).filter(Boolean)) {
    const at = part.indexOf("=");
    if (at <= 0) return null;
    labels[part.slice(0, at)] = part.slice(at + 1);
  }
  return labels;
}

export function StateBadge({ state }: { state: JobState }) {
  const name = jobStateName(state);
  return <span className={`badge state-${name.toLowerCase()}`}>{name}</span>;
}

// Browsers open at most 6 HTTP/1.1 connections to one origin, and each stream holds one:
// the newest few unfinished jobs follow their streams, the rest the list's refresh.
const LIVE_ROWS = 3;

function JobRow({ job, live }: { job: Job; live: boolean }) {
  const [state, setState] = useState(job.state);
  useEffect(() => setState(job.state), [job.state]);
  useLiveStream(
    async (signal) => {
      if (!live || TERMINAL_JOB_STATES.has(job.state)) return;
      let last = job.state;
      for await (const event of jobs.watchJob({ jobId: job.jobId }, { signal })) {
        setState(event.state);
        last = event.state;
      }
      if (!TERMINAL_JOB_STATES.has(last)) {
        throw new ConnectError("the job's event stream ended early", Code.Unavailable);
      }
    },
    [job.jobId, live],
  );
  return (
    <tr data-job-id={job.jobId}>
      <td>
        <a href={`#/jobs/${encodeURIComponent(job.jobId)}`} title={job.jobId}>
          {shortId(job.jobId)}
        </a>
      </td>
      <td>
        <StateBadge state={state} />
      </td>
      <td className="wrap wide-only">{job.spec?.image}</td>
      <td>{job.spec?.gpuCount ?? 0}</td>
      <td>{credits(job.chargedMicroCredits)}</td>
      <td className="wide-only">{when(job.createdAt)}</td>
    </tr>
  );
}

export function JobsPage() {
  const [filter, setFilter] = useState({ state: "", labels: "", prefix: "" });
  const [applied, setApplied] = useState(filter);
  const [list, setList] = useState<Job[]>([]);
  const [error, setError] = useState("");

  useRefresh(
    async () => {
      const labels = parseLabels(applied.labels);
      if (labels === null) {
        setError("Labels: write KEY=VALUE, separated by commas.");
        return;
      }
      try {
        const reply = await jobs.listJobs({
          states: applied.state ? [Number(applied.state) as JobState] : [],
          labels,
          idPrefix: applied.prefix.trim(),
          pageSize: 50,
        });
        setList(reply.jobs);
        setError("");
      } catch (failure) {
        setError(describe(failure));
      }
    },
    15_000,
    [applied],
  );

  const liveIds = new Set(
    list
      .filter((j) => !TERMINAL_JOB_STATES.has(j.state))
      .slice(0, LIVE_ROWS)
      .map((j) => j.jobId),
  );

  function submit(event: FormEvent) {
    event.preventDefault();
    setApplied({ ...filter });
  }

  return (
    <section>
      <h1>Jobs</h1>
      <form className="filters" onSubmit={submit} aria-label="Filter jobs">
        <label>
          State
          <select value={filter.state} onChange={(e) => setFilter({ ...filter, state: e.target.value })}>
            <option value="">any</option>
            {STATES.map((s) => (
              <option key={s} value={s}>
                {jobStateName(s)}
              </option>
            ))}
          </select>
        </label>
        <label>
          Labels
          <input
            placeholder="team=ml,run=7"
            value={filter.labels}
            onChange={(e) => setFilter({ ...filter, labels: e.target.value })}
          />
        </label>
        <label>
          Id prefix
          <input value={filter.prefix} onChange={(e) => setFilter({ ...filter, prefix: e.target.value })} />
        </label>
        <button type="submit">Filter</button>
        <a className="button" href="#/submit">
          New job
        </a>
      </form>
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
      <div className="table-wrap">
        <table>
          <caption className="visually-hidden">Your jobs, newest first</caption>
          <thead>
            <tr>
              <th scope="col">Job</th>
              <th scope="col">State</th>
              <th scope="col" className="wide-only">Image</th>
              <th scope="col">GPUs</th>
              <th scope="col">Charged</th>
              <th scope="col" className="wide-only">Created</th>
            </tr>
          </thead>
          <tbody>
            {list.map((job) => (
              <JobRow key={job.jobId} job={job} live={liveIds.has(job.jobId)} />
            ))}
            {list.length === 0 && (
              <tr>
                <td colSpan={6}>No jobs match.</td>
              </tr>
            )}
          </tbody>
        </table>
      </div>
    </section>
  );
}
