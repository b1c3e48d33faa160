"""The `gpuplane` command line: the marketplace's client, and the launcher of its processes.

Entry point: `gpuplane = "gpuplane_cli.main:main"` (pyproject.toml); `main.build_parser()`
builds one argparse tree from each command module's `register()`:

- `up` (up.py, demo.py, stackinfo.py): the embedded local stack (NATS, S3, a control plane
  on SQLite), with `--demo` a local daemon and one job run end to end.
- `controlplane serve`, `daemon run|install` (serve.py): the long-running processes; the
  daemon's own parser is loaded only for `daemon` commands.
- `jobs submit|list|get|cancel|watch|logs|results|verify` (jobs.py, follow.py, verify.py):
  consumers' jobs.
- `hosts list|get|drain|undrain`, `offers` (hosts.py): the supply side.
- `ledger balance|statement|deposit|payout|refund|usage|check` (ledger.py): credits.
- `admin tenants|keys|tokens`, `whoami` (admin.py): tenants, API keys, registration tokens.
- `nats init` (natskeys.py): the NATS operator and account seeds and server config.
- `completion bash|zsh|fish` (completion.py): the shell completion script; job and host ids
  complete from the API.

Client commands reach the control plane over gRPC as client.py says (GPUPLANE_ADDR,
GPUPLANE_API_KEY, TLS files, env files) and map its status codes to exit codes; args.py
holds the shared argparse helpers, hints.py the usage errors' hints ("did you mean", a job
command without `--`), output.py the table/JSON rendering, units.py the exact parsing of
credits, durations and sizes.
"""
