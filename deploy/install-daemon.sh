#!/usr/bin/env bash
# Installs the gpuplane provider daemon on this GPU host: checks the NVIDIA driver, container
# toolkit and Docker, creates a virtualenv, writes the config (0600) and a systemd unit, and
# enables the service. A thin wrapper over `gpuplane daemon install` (daemon/install.py,
# standard library only), runnable from a checkout before anything is installed.
#
#   sudo deploy/install-daemon.sh --control-plane cp.example.com:50051 --token grt_...
#   deploy/install-daemon.sh --dry-run ...     # prints every action, changes nothing
#   deploy/install-daemon.sh --help            # every option
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The first interpreter new enough for the daemon (3.11+); PYTHON overrides the search.
pick_python() {
    local candidate
    for candidate in ${PYTHON:-} python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

if ! python="$(pick_python)"; then
    echo "error: the daemon needs Python 3.11 or newer (none found on PATH)." >&2
    echo "  Debian/Ubuntu: sudo apt install python3.11 python3.11-venv; or set PYTHON=/path" >&2
    exit 1
fi

if [[ -f "$repo/daemon/install.py" ]]; then
    cd "$repo"
    exec env PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" -m daemon.install \
        --python "$python" "$@"
fi
if command -v gpuplane >/dev/null 2>&1; then
    exec gpuplane daemon install "$@"
fi
echo "error: run this script from a gpuplane checkout (deploy/ next to daemon/)," >&2
echo "  or install gpuplane and run: gpuplane daemon install" >&2
exit 1
