// A small line chart drawn as SVG (no chart library, no fonts to fetch): one or more
// series over time, each scaled to its own maximum or a fixed one.
import { localTime } from "../format";
export interface Series {
  label: string;
  unit: string;
  color: string;
  points: Array<[number, number]>; // [unix seconds, value]
  max?: number;
}

const W = 320;
const H = 120;
const PAD = 4;

function path(points: Array<[number, number]>, t0: number, t1: number, max: number): string {
  const span = Math.max(t1 - t0, 1);
  return points
    .map(([t, v], i) => {
      const x = PAD + ((t - t0) / span) * (W - 2 * PAD);
      const y = H - PAD - (Math.min(v, max) / max) * (H - 2 * PAD);
      return `${i ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`;
    })
    .join(" ");
}

export function Chart({ title, series, testId }: { title: string; series: Series[]; testId?: string }) {
  const all = series.flatMap((s) => s.points.map(([t]) => t));
  const t0 = all.length ? Math.min(...all) : 0;
  const t1 = all.length ? Math.max(...all) : 1;
  const latest = (s: Series) => (s.points.length ? s.points[s.points.length - 1][1] : undefined);
  return (
    <figure className="chart" data-testid={testId}>
      <figcaption>{title}</figcaption>
      <svg viewBox={`0 0 ${W} ${H}`} role="img" aria-label={`${title} over time`} preserveAspectRatio="none">
        <rect x="0" y="0" width={W} height={H} className="chart-bg" />
        {series.map((s) => {
          const max = s.max ?? Math.max(1, ...s.points.map(([, v]) => v));
          return (
            <path key={s.label} d={path(s.points, t0, t1, max)} stroke={s.color} fill="none" strokeWidth="2" />
          );
        })}
      </svg>
      {all.length > 0 && (
        <p className="chart-span">
          <span>{localTime(new Date(t0 * 1000)).slice(11)}</span>
          <span>{localTime(new Date(t1 * 1000)).slice(11)}</span>
        </p>
      )}
      <ul className="legend">
        {series.map((s) => (
          <li key={s.label} data-series={s.label} data-latest={latest(s) ?? ""} data-count={s.points.length}>
            <span className="swatch" style={{ background: s.color }} aria-hidden="true" />
            {s.label}: {latest(s) === undefined ? "no samples" : `${round(latest(s)!)} ${s.unit}`}
          </li>
        ))}
      </ul>
    </figure>
  );
}

function round(value: number): string {
  return Number.isInteger(value) ? String(value) : value.toFixed(1);
}
