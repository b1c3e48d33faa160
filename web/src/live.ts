// Server streams that reconnect by themselves (a control plane restart, a dropped
// connection): each failure waits a little longer, up to 5 s, then the stream reopens.
import { useEffect, useState } from "react";
import { describe, retryable } from "./api";

export interface StreamStatus {
  connected: boolean;
  error: string;
}

/**
 * Runs `open(signal)` (which consumes one stream to its end) until it returns normally or
 * fails for good; `open` is called again after each retryable failure.
 */
export function useLiveStream(
  open: (signal: AbortSignal, reconnect: boolean) => Promise<void>,
  deps: unknown[],
): StreamStatus {
  const [status, setStatus] = useState<StreamStatus>({ connected: false, error: "" });
  useEffect(() => {
    const controller = new AbortController();
    void (async () => {
      let delay = 500;
      for (let tries = 0; !controller.signal.aborted; tries++) {
        try {
          setStatus({ connected: true, error: "" });
          await open(controller.signal, tries > 0);
          setStatus({ connected: false, error: "" });
          return;
        } catch (error) {
          if (controller.signal.aborted) return;
          const message = describe(error);
          setStatus({ connected: false, error: message });
          if (!retryable(error)) return;
          await new Promise((resolve) => setTimeout(resolve, delay));
          delay = Math.min(delay * 2, 5000);
        }
      }
    })();
    return () => controller.abort();
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, deps);
  return status;
}

/** Calls `load` now and every `everyMs` while mounted (for data no stream carries). */
export function useRefresh(load: () => Promise<void>, everyMs: number, deps: unknown[]): void {
  useEffect(() => {
    let stopped = false;
    const run = async () => {
      if (!stopped) await load().catch(() => undefined);
    };
    void run();
    const timer = everyMs > 0 ? setInterval(run, everyMs) : undefined;
    return () => {
      stopped = true;
      if (timer) clearInterval(timer);
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, deps);
}
