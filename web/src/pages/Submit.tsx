// The submit form with a live quote (SubmitJob with dry_run). What is typed is kept in
// sessionStorage, so an expired session or a reload loses nothing; the idempotency key is
// kept with it, so submitting again after a lost answer cannot create a second job.
import { useEffect, useState, type FormEvent } from "react";
import { create } from "@bufbuild/protobuf";
import { jobs, describe } from "../api";
import type { Quote } from "../gen/gpuplane/v1/jobs_pb";
import { JobSpecSchema, NetworkMode, type JobSpec } from "../gen/gpuplane/v1/types_pb";
import { credits, parseCredits } from "../format";
import { navigate } from "../router";

const STORAGE = "gpuplane.submit-form";

interface Form {
  image: string;
  command: string;
  env: string;
  labels: string;
  gpuCount: string;
  gpuModels: string;
  minVramGib: string;
  inputs: string;
  network: string;
  maxDurationSeconds: string;
  maxPrice: string;
  budget: string;
  idempotencyKey: string;
}

const EMPTY: Form = {
  image: "",
  command: "",
  env: "",
  labels: "",
  gpuCount: "1",
  gpuModels: "",
  minVramGib: "0",
  inputs: "",
  network: "none",
  maxDurationSeconds: "3600",
  maxPrice: "",
  budget: "",
  idempotencyKey: "",
};

/** A fresh idempotency key (crypto.randomUUID needs a secure context; plain http has none). */
function newKey(): string {
  const random = new Uint8Array(16);
  crypto.getRandomValues(random);
  return Array.from(random, (b) => b.toString(16).padStart(2, "0")).join("");
}

function restore(): Form {
  try {
    const saved = JSON.parse(sessionStorage.getItem(STORAGE) ?? "null");
    if (saved && typeof saved === "object") return { ...EMPTY, ...saved };
  } catch {
    // a garbled entry: start afresh
  }
  return { ...EMPTY, idempotencyKey: newKey() };
}

function pairs(text: string, what: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split("\n").map((l) => l.trim()).filter(Boolean)) {
    const at = line.indexOf("=");
    if (at <= 0) throw new Error(`${what}: "${line}" is not KEY=VALUE`);
    out[line.slice(0, at)] = line.slice(at + 1);
  }
  return out;
}

function whole(text: string, what: string): number {
  if (!/^\s*\d+\s*$/.test(text)) throw new Error(`${what}: a whole number, please`);
  return Number(text);
}

function money(text: string, what: string): bigint {
  if (!text.trim()) return 0n;
  const value = parseCredits(text);
  if (value === null) throw new Error(`${what}: credits, e.g. 2.5`);
  return value;
}

/** The spec the form describes; throws naming the field that is not right. */
function specOf(form: Form): JobSpec {
  return create(JobSpecSchema, {
    image: form.image.trim(),
    command: form.command.split("\n").filter((l) => l.length > 0),
    env: pairs(form.env, "Environment"),
    labels: pairs(form.labels, "Labels"),
    gpuCount: whole(form.gpuCount, "GPUs"),
    gpuModels: form.gpuModels.split(",").map((m) => m.trim()).filter(Boolean),
    minVramGib: whole(form.minVramGib || "0", "Min VRAM"),
    inputs: form.inputs
      .split("\n")
      .map((l) => l.trim())
      .filter(Boolean)
      .map((key) => ({ key })),
    network: form.network === "bridge" ? NetworkMode.BRIDGE : NetworkMode.NONE,
    maxDurationSeconds: BigInt(whole(form.maxDurationSeconds, "Max duration")),
    maxPricePerGpuHourMicroCredits: money(form.maxPrice, "Max price"),
    budgetMicroCredits: money(form.budget, "Budget"),
  });
}

function QuoteView({ quote }: { quote: Quote }) {
  return (
    <div className="quote" data-testid="quote">
      <p>
        <strong>Hold {credits(quote.holdMicroCredits)}</strong> · {quote.matchingHostCount} matching host(s) ·
        price {credits(quote.minPricePerGpuHourMicroCredits)}–{credits(quote.maxPricePerGpuHourMicroCredits)} per
        GPU-hour · available {credits(quote.availableMicroCredits)}
      </p>
      {quote.explanation && <p>{quote.explanation}</p>}
      {quote.creditShortfall && <p className="error">{quote.creditShortfall}</p>}
      {quote.spendingLimitShortfall && <p className="error">{quote.spendingLimitShortfall}</p>}
    </div>
  );
}

function Field(props: {
  id: keyof Form;
  label: string;
  form: Form;
  set: (f: Form) => void;
  hint?: string;
  area?: boolean;
  required?: boolean;
  inputMode?: "numeric" | "decimal";
}) {
  const { id, label, form, set, hint, area } = props;
  const common = {
    id: `f-${id}`,
    name: id,
    value: form[id],
    required: props.required,
    "aria-describedby": hint ? `f-${id}-hint` : undefined,
  };
  return (
    <div className="field">
      <label htmlFor={`f-${id}`}>{label}</label>
      {area ? (
        <textarea rows={3} {...common} onChange={(e) => set({ ...form, [id]: e.target.value })} />
      ) : (
        <input inputMode={props.inputMode} {...common} onChange={(e) => set({ ...form, [id]: e.target.value })} />
      )}
      {hint && (
        <small id={`f-${id}-hint`} className="muted">
          {hint}
        </small>
      )}
    </div>
  );
}

export function SubmitPage() {
  const [form, setForm] = useState<Form>(restore);
  const [quote, setQuote] = useState<Quote | null>(null);
  const [problem, setProblem] = useState("");
  const [busy, setBusy] = useState(false);

  useEffect(() => sessionStorage.setItem(STORAGE, JSON.stringify(form)), [form]);

  // The live quote: half a second after the last change, then every 10 s (the market moves).
  useEffect(() => {
    const quoteNow = async () => {
      if (!form.image.trim()) {
        setQuote(null);
        return;
      }
      try {
        const reply = await jobs.submitJob({ spec: specOf(form), dryRun: true });
        setQuote(reply.quote ?? null);
        setProblem("");
      } catch (failure) {
        setQuote(null);
        setProblem(failure instanceof Error && !("code" in failure) ? failure.message : describe(failure));
      }
    };
    const first = setTimeout(quoteNow, 500);
    const again = setInterval(quoteNow, 10_000);
    return () => {
      clearTimeout(first);
      clearInterval(again);
    };
  }, [form]);

  async function submit(event: FormEvent) {
    event.preventDefault();
    setBusy(true);
    try {
      const reply = await jobs.submitJob({ spec: specOf(form), idempotencyKey: form.idempotencyKey });
      sessionStorage.removeItem(STORAGE);
      if (reply.job) navigate(`/jobs/${encodeURIComponent(reply.job.jobId)}`);
    } catch (failure) {
      setProblem(failure instanceof Error && !("code" in failure) ? failure.message : describe(failure));
    } finally {
      setBusy(false);
    }
  }

  return (
    <section>
      <h1>Submit a job</h1>
      <form className="submit" onSubmit={submit} aria-label="Submit a job">
        <Field id="image" label="Image" form={form} set={setForm} required hint="e.g. busybox:latest" />
        <Field id="command" label="Command" form={form} set={setForm} area hint="One argument per line; empty: the image's entrypoint." />
        <Field id="gpuCount" label="GPUs" form={form} set={setForm} inputMode="numeric" />
        <Field id="gpuModels" label="GPU models" form={form} set={setForm} hint="Comma-separated, e.g. H100,A100; empty: any." />
        <Field id="minVramGib" label="Min VRAM per GPU (GiB)" form={form} set={setForm} inputMode="numeric" />
        <div className="field">
          <label htmlFor="f-network">Network</label>
          <select id="f-network" value={form.network} onChange={(e) => setForm({ ...form, network: e.target.value })}>
            <option value="none">none (no network in the container)</option>
            <option value="bridge">bridge (outbound through the host)</option>
          </select>
        </div>
        <Field
          id="inputs"
          label="Inputs"
          form={form}
          set={setForm}
          area
          hint="Keys of your uploaded data (gpuplane data put), one per line; found under /input."
        />
        <Field id="maxDurationSeconds" label="Max duration (seconds)" form={form} set={setForm} inputMode="numeric" />
        <Field id="maxPrice" label="Max price per GPU-hour (credits)" form={form} set={setForm} inputMode="decimal" />
        <Field id="budget" label="Budget (credits)" form={form} set={setForm} inputMode="decimal" hint="Empty: price × GPUs × max duration." />
        <Field id="env" label="Environment" form={form} set={setForm} area hint="KEY=VALUE, one per line." />
        <Field id="labels" label="Labels" form={form} set={setForm} area hint="KEY=VALUE, one per line." />
        <div className="actions">
          <button type="submit" disabled={busy || !form.image.trim()}>
            {busy ? "Submitting…" : "Submit job"}
          </button>
          <button
            type="button"
            className="secondary"
            onClick={() => setForm({ ...EMPTY, idempotencyKey: newKey() })}
          >
            Clear
          </button>
        </div>
      </form>
      <div aria-live="polite">
        {problem && (
          <p className="error" role="alert">
            {problem}
          </p>
        )}
        {quote && <QuoteView quote={quote} />}
      </div>
    </section>
  );
}
