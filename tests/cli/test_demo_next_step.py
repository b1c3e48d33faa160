"""The commands `gpuplane up --demo` prints as the next steps work, run exactly as printed in a
shell after the demo (which leaves 100 credits less the demo job's cost): the job submit's
hold is priced on the demo host (2 credits per GPU-hour), not the 100-credit ceiling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.test_up import running_up

HEADER = "Use it from another shell:"


def next_steps(output: str) -> list[str]:
    """The indented command lines under the banner's HEADER."""
    lines = output.splitlines()
    start = lines.index(HEADER) + 1
    steps: list[str] = []
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        steps.append(line.strip())
    return steps


@pytest.mark.docker
@pytest.mark.timeout(300)
def test_the_printed_next_steps_succeed_as_printed(tmp_path: Path) -> None:
    with running_up(tmp_path / "stack", "--demo") as run:
        run.wait_for(" earnings: ", timeout=240)  # the demo's last line
        steps = next_steps("".join(run.output))
        submit = [s for s in steps if s.startswith("gpuplane jobs submit ")]
        assert len(submit) == 1, steps
        assert "--wait" in submit[0]
        # Only the submit, right after the demo: its hold must fit what the demo left.
        env_line = steps[0]
        assert env_line.startswith("set -a; . "), steps
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPLANE_")}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        first = subprocess.run(
            ["bash", "-ec", f"{env_line}\n{submit[0]}"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert first.returncode == 0, first.stdout + first.stderr
        assert "holding 2.000000" in first.stdout  # 1 GPU × 1 h × the host's 2 credits
        assert "attempt 1  SUCCEEDED  exit 0" in first.stdout, first.stdout
        assert "--- stdout ---\ndone\n" in first.stdout

        # Then every printed line, in order, in one shell, as a user pastes them.
        every = subprocess.run(
            ["bash", "-ec", "\n".join(steps)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert every.returncode == 0, every.stdout + every.stderr
        assert "ROLE_CONSUMER" in every.stdout  # the last line: grpcurl WhoAmI
        assert run.interrupt(timeout=60) == 0, "".join(run.output)
