// One job: state and cost, its events and attempts, live logs (StreamLogs with follow), a
// GPU chart, its results with download links, and cancel.
import { useCallback, useRef, useState } from "react";
import { Code, ConnectError } from "@connectrpc/connect";
import { jobs, describe } from "../api";
import type { GetResultsResponse } from "../gen/gpuplane/v1/jobs_pb";
import type { Job, JobEvent } from "../gen/gpuplane/v1/types_pb";
import { JobState, LogStream } from "../gen/gpuplane/v1/types_pb";
import {
  attemptStateName,
  bytes,
  credits,
  duration,
  jobStateName,
  seconds,
  shortId,
  TERMINAL_JOB_STATES,
  when,
} from "../format";
import { Chart } from "../components/Chart";
import { StateBadge } from "./Jobs";
import { useLiveStream, useRefresh } from "../live";

const MAX_LOG = 200_000;

interface Snapshot {
  t: number;
  utilisation: number;
  memoryGiB: number;
}

/** Each attempt's mean utilisation and peak memory over its run: the chart of a job that
 * ran while the page was not open. */
function attemptPoints(job: Job): Snapshot[] {
  const now = Date.now() / 1000;
  return job.attempts
    .filter((a) => a.startedAt)
    .flatMap((a) => {
      const value = {
        utilisation: a.avgGpuUtilizationBasisPoints / 100,
        memoryGiB: Number(a.peakGpuMemoryBytes) / 2 ** 30,
      };
      const end = a.finishedAt ? seconds(a.finishedAt) : now;
      return [
        { t: seconds(a.startedAt), ...value },
        { t: end, ...value },
      ];
    });
}

function Logs({ jobId, finished }: { jobId: string; finished: boolean }) {
  const [text, setText] = useState("");
  const box = useRef<HTMLPreElement>(null);
  const status = useLiveStream(
    async (signal) => {
      setText(""); // a reconnect streams the attempt's logs from the start again
      // One decoder per stream: a character split across two chunks is joined again.
      const decoders = new Map<LogStream, TextDecoder>();
      for await (const chunk of jobs.streamLogs({ jobId, follow: true }, { signal })) {
        let decoder = decoders.get(chunk.stream);
        if (!decoder) decoders.set(chunk.stream, (decoder = new TextDecoder()));
        const part = decoder.decode(chunk.data, { stream: true });
        const marked = chunk.stream === LogStream.STDERR ? part.replace(/^(?=.)/gm, "! ") : part;
        setText((old) => (old + marked).slice(-MAX_LOG));
        const el = box.current;
        if (el && el.scrollHeight - el.scrollTop - el.clientHeight < 40) {
          requestAnimationFrame(() => (el.scrollTop = el.scrollHeight));
        }
      }
    },
    [jobId],
  );
  return (
    <section aria-labelledby="logs-h">
      <h2 id="logs-h">
        Logs{" "}
        <span className="muted" data-testid="log-status">
          {status.connected ? "(following)" : status.error ? `(${status.error})` : ""}
        </span>
      </h2>
      <pre className="logs" ref={box} tabIndex={0} aria-label="Job logs" data-testid="logs">
        {text || (finished ? "No output." : "No output yet.")}
      </pre>
    </section>
  );
}

function Results({ jobId }: { jobId: string }) {
  const [results, setResults] = useState<GetResultsResponse | null>(null);
  const [error, setError] = useState("");
  useRefresh(
    async () => {
      try {
        setResults(await jobs.getResults({ jobId }));
      } catch (failure) {
        setError(describe(failure));
      }
    },
    0,
    [jobId],
  );
  return (
    <section aria-labelledby="results-h">
      <h2 id="results-h">Results</h2>
      {error && <p className="muted">{error}</p>}
      {results && results.objects.length === 0 && <p className="muted">No results stored.</p>}
      <ul className="results">
        {results?.objects.map((o) => (
          <li key={o.key}>
            <a href={o.url} download={o.path.split("/").pop()} target="_blank" rel="noopener noreferrer">
              {o.path}
            </a>{" "}
            <span className="muted">
              {bytes(o.sizeBytes)} · sha256 {o.sha256.slice(0, 12)}…
            </span>
          </li>
        ))}
      </ul>
    </section>
  );
}

export function JobPage({ jobId }: { jobId: string }) {
  const [job, setJob] = useState<Job | null>(null);
  const [events, setEvents] = useState<JobEvent[]>([]);
  const lastSeq = useRef(0n);
  const [history, setHistory] = useState<Snapshot[]>([]);
  const [error, setError] = useState("");
  const [cancelling, setCancelling] = useState(false);

  const load = useCallback(async () => {
    try {
      const { job: fresh } = await jobs.getJob({ jobId });
      if (!fresh) return;
      setJob(fresh);
      setError("");
      const usage = fresh.usage;
      if (usage && fresh.state === JobState.RUNNING) {
        const point = {
          t: Date.now() / 1000,
          utilisation: usage.avgGpuUtilizationBasisPoints / 100,
          memoryGiB: Number(usage.peakGpuMemoryBytes) / 2 ** 30,
        };
        setHistory((old) => [...old.slice(-299), point]);
      }
    } catch (failure) {
      setError(describe(failure));
    }
  }, [jobId]);

  const finished = job !== null && TERMINAL_JOB_STATES.has(job.state);
  const running = job?.state === JobState.RUNNING;
  // Cost and usage are not events: refresh them every 2 s while the job runs (the chart),
  // every 5 s while it waits.
  useRefresh(load, finished ? 0 : running ? 2000 : 5000, [jobId, finished, running]);

  const watch = useLiveStream(
    async (signal) => {
      const after = lastSeq.current; // resumes after what the page already shows
      let last: JobState | undefined;
      for await (const event of jobs.watchJob({ jobId, afterSeq: after }, { signal })) {
        setEvents((old) => (old.some((e) => e.seq === event.seq) ? old : [...old, event]));
        if (event.seq > lastSeq.current) lastSeq.current = event.seq;
        last = event.state;
        void load();
      }
      await load();
      if (last !== undefined && !TERMINAL_JOB_STATES.has(last)) {
        // Ended before the job did (a control plane shutting down): open it again.
        throw new ConnectError("the job's event stream ended early", Code.Unavailable);
      }
    },
    [jobId],
  );

  async function cancel() {
    if (!window.confirm("Cancel this job?")) return;
    setCancelling(true);
    try {
      const reply = await jobs.cancelJob({ jobId, reason: "cancelled from the dashboard" });
      if (reply.job) setJob(reply.job);
    } catch (failure) {
      setError(describe(failure));
    } finally {
      setCancelling(false);
    }
  }

  if (!job) {
    return <p role={error ? "alert" : undefined}>{error || "Loading…"}</p>;
  }
  const spec = job.spec;
  const plotted = history.length >= 2 ? history : attemptPoints(job);
  return (
    <article className="job">
      <header className="page-head">
        <h1>
          Job <code>{job.jobId}</code>
        </h1>
        <StateBadge state={job.state} />
        {!finished && (
          <button type="button" className="danger" onClick={cancel} disabled={cancelling}>
            {cancelling ? "Cancelling…" : "Cancel job"}
          </button>
        )}
      </header>
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
      {watch.error && <p className="muted">Live updates: {watch.error}</p>}
      <dl className="facts">
        <dt>Image</dt>
        <dd>{spec?.image}</dd>
        <dt>Command</dt>
        <dd>
          <code>{[...(spec?.command ?? []), ...(spec?.args ?? [])].join(" ") || "(image default)"}</code>
        </dd>
        <dt>GPUs</dt>
        <dd>{spec?.gpuCount ?? 0}</dd>
        <dt>Reason</dt>
        <dd>{job.stateReason || "—"}</dd>
        <dt>Cost so far</dt>
        <dd data-testid="cost">{credits(job.chargedMicroCredits)}</dd>
        <dt>Held</dt>
        <dd>{credits(job.holdMicroCredits)}</dd>
        <dt>Price</dt>
        <dd>{credits(job.pricePerGpuHourMicroCredits)} per GPU-hour</dd>
        <dt>Run time</dt>
        <dd>{duration(job.usage?.runTimeMs ?? 0n)}</dd>
        <dt>Host</dt>
        <dd>{job.hostId || "—"}</dd>
      </dl>
      <div className="two">
        <section aria-labelledby="timeline-h">
          <h2 id="timeline-h">Timeline</h2>
          <ol className="timeline" data-testid="timeline">
            {events.map((e) => (
              <li key={String(e.seq)}>
                <time>{when(e.time)}</time> <strong>{jobStateName(e.state)}</strong>
                {e.attempt ? ` · attempt ${e.attempt}` : ""}
                {e.reason ? ` — ${e.reason}` : ""}
              </li>
            ))}
          </ol>
        </section>
        <section aria-labelledby="gpu-h">
          <h2 id="gpu-h">GPU use</h2>
          <Chart
            title="Mean GPU utilisation and peak memory"
            testId="job-gpu-chart"
            series={[
              {
                label: "utilisation",
                unit: "%",
                color: "#2563eb",
                max: 100,
                points: plotted.map((p) => [p.t, p.utilisation]),
              },
              {
                label: "peak memory",
                unit: "GiB",
                color: "#c2410c",
                points: plotted.map((p) => [p.t, p.memoryGiB]),
              },
            ]}
          />
          <p className="muted">
            Mean so far {((job.usage?.avgGpuUtilizationBasisPoints ?? 0) / 100).toFixed(1)} %, peak memory{" "}
            {bytes(job.usage?.peakGpuMemoryBytes ?? 0n)}.
          </p>
        </section>
      </div>
      <section aria-labelledby="attempts-h">
        <h2 id="attempts-h">Attempts</h2>
        <div className="table-wrap">
          <table>
            <thead>
              <tr>
                <th scope="col">#</th>
                <th scope="col">State</th>
                <th scope="col">Host</th>
                <th scope="col">Started</th>
                <th scope="col">Ended</th>
                <th scope="col">Charged</th>
                <th scope="col">GPU util.</th>
              </tr>
            </thead>
            <tbody>
              {job.attempts.map((a) => (
                <tr key={a.attempt}>
                  <td>{a.attempt}</td>
                  <td>{attemptStateName(a.attemptState)}</td>
                  <td title={a.hostId}>{shortId(a.hostId)}</td>
                  <td>{when(a.startedAt)}</td>
                  <td>{when(a.finishedAt)}</td>
                  <td>{credits(a.chargedMicroCredits)}</td>
                  <td>{(a.avgGpuUtilizationBasisPoints / 100).toFixed(0)} %</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      </section>
      <Logs jobId={jobId} finished={finished} />
      {finished && <Results jobId={jobId} />}
    </article>
  );
}
