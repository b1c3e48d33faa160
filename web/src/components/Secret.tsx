// A secret the server shows once (an API key, a registration token), with how to use it.
export function Secret({ title, secret, usage }: { title: string; secret: string; usage?: string }) {
  return (
    <div className="secret" role="status" data-testid="secret">
      <p>
        <strong>{title}</strong> It is shown only now: copy it.
      </p>
      <code className="secret-value">{secret}</code>
      {usage && (
        <p className="muted">
          Use it as: <code>{usage}</code>
        </p>
      )}
    </div>
  );
}
