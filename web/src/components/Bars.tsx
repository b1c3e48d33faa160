// A labelled horizontal bar chart in plain HTML (one row per bar, widths in percent).
export function Bars({
  title,
  rows,
  show = (value) => (Number.isInteger(value) ? String(value) : value.toFixed(2)),
}: {
  title: string;
  rows: Array<[string, number]>;
  show?: (value: number) => string;
}) {
  const max = Math.max(1e-9, ...rows.map(([, v]) => v));
  return (
    <figure className="bars">
      <figcaption>{title}</figcaption>
      {rows.length === 0 && <p className="muted">No data.</p>}
      <ul>
        {rows.map(([label, value], i) => (
          <li key={`${label}-${i}`}>
            <span className="bar-label">{label}</span>
            <span className="bar" style={{ width: `${(100 * value) / max}%` }} aria-hidden="true" />
            <span className="bar-value">{show(value)}</span>
          </li>
        ))}
      </ul>
    </figure>
  );
}
