"""`gpuplane completion`: each shell's script, loaded in a real bash, zsh and fish (bootstrap
installs them), completes job and host ids from a real control plane (only the caller's,
only those matching the prefix) and offers nothing, without a traceback, when the lookup
fails."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from devstack import free_port
from devstack.factories import new_host, new_job, new_tenant, new_token
from tests.harness import CREDIT, JobPlane

pytestmark = pytest.mark.databases("sqlite")

BIN = Path(sys.executable).parent
SHELLS = ("bash", "zsh", "fish")
# Each loads the completion script as a user's shell does, then asks it to complete each
# line given (the cursor at its end), printing the candidates one a line and `@@` after each.
DRIVERS = {
    "bash": r"""
source <(gpuplane completion bash) || exit 3
complete -p gpuplane >/dev/null || exit 4
for line in "$@"; do
    COMP_LINE="$line"
    COMP_POINT=${#line}
    COMPREPLY=()
    _python_argcomplete gpuplane
    printf '%s\n' "${COMPREPLY[@]}" @@
done
""",
    # The script's own zsh branch runs, as compinit calls it; only _describe (zsh's widget
    # that shows candidates) is replaced by one that prints them.
    "zsh": r"""
autoload -U compinit && compinit -u -D
source <(gpuplane completion zsh) || exit 3
(( $+_comps[gpuplane] )) || exit 4
_describe() { print -rl -- "${(@P)2}" }
for line in "$@"; do
    BUFFER=$line
    CURSOR=${#line}
    words=(${=line})
    _python_argcomplete
    print -- @@
done
""",
    # fish's own `complete -C` completes a command line with the loaded completions.
    "fish": r"""
gpuplane completion fish | source; or exit 3
for line in $argv
    complete -C "$line"
    echo @@
end
""",
}
# How each runs a script with arguments (bash and zsh take $0 first, fish does not).
SHELL_ARGV = {
    "bash": ["bash", "-c", DRIVERS["bash"], "driver"],
    "zsh": ["zsh", "-f", "-c", DRIVERS["zsh"], "driver"],
    "fish": ["fish", "--no-config", "-c", DRIVERS["fish"]],
}


def environment(plane_addr: str, key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPLANE_")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        GPUPLANE_ADDR=plane_addr,
        GPUPLANE_API_KEY=key,
        GPUPLANE_PLAINTEXT="1",
    )
    return env


async def drive(shell: str, env: dict[str, str], *lines: str) -> str:
    """What the shell's driver prints for the lines: candidates one a line, `@@` after each
    line's (zsh and fish add each candidate's description after `:` or a tab)."""
    done = await asyncio.to_thread(
        subprocess.run,
        [*SHELL_ARGV[shell], *lines],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"{shell}: {done.stderr}"
    return done.stdout


async def complete_in(shell: str, env: dict[str, str], *lines: str) -> list[list[str]]:
    """The candidates the shell's completion offers for each line, without descriptions."""
    out = await drive(shell, env, *lines)
    replies: list[list[str]] = [[]]
    for candidate in out.splitlines():
        if candidate == "@@":
            replies.append([])
        elif candidate.strip():
            replies[-1].append(candidate.split("\t")[0].split(":")[0].strip())
    assert replies.pop() == [], out
    assert len(replies) == len(lines), out
    return replies


def distinguishing_prefix(one: str, other: str) -> str:
    """The shortest prefix of `one` that `other` does not start with."""
    at = next(i for i, (x, y) in enumerate(zip(one, other, strict=False)) if x != y)
    return one[: at + 1]


async def test_each_shell_completes_job_ids_from_the_api(plane: JobPlane) -> None:
    job = await new_job(plane, plane.consumer_key)
    first, second = job.job_id, (await new_job(plane, plane.consumer_key)).job_id
    common = os.path.commonprefix([first, second])
    env = environment(plane.address, plane.consumer_key)

    lines = [
        f"gpuplane jobs get {distinguishing_prefix(first, second)}",
        f"gpuplane jobs cancel {distinguishing_prefix(second, first)}",
        f"gpuplane jobs logs --follow {common}",
        f"gpuplane ledger usage --job {distinguishing_prefix(first, second)}",
        "gpuplane jobs get job_no_such_prefix",
        "gpuplane jo",
        "gpuplane jobs l",
    ]
    for shell in SHELLS:
        replies = await complete_in(shell, env, *lines)
        assert replies[0] == [first], shell
        assert replies[1] == [second], shell
        assert sorted(replies[2]) == sorted([first, second]), shell
        assert replies[3] == [first], shell
        assert replies[4] == [], shell
        assert replies[5] == ["jobs"], shell
        assert sorted(replies[6]) == ["list", "logs"], shell
    # fish and zsh show each id's state and image beside it.
    described = f"QUEUED {job.spec.image}"
    assert await drive("fish", env, lines[0]) == f"{first}\t{described}\n@@\n"
    assert await drive("zsh", env, lines[0]) == f"{first}:{described}\n@@\n"

    # Every other command that takes a job id completes it too.
    others = ["jobs watch", "jobs results", "jobs efficiency", "jobs verify", "ledger refund",
              "ledger statement --job"]  # fmt: skip
    prefix = distinguishing_prefix(second, first)
    replies = await complete_in("bash", env, *(f"gpuplane {words} {prefix}" for words in others))
    assert replies == [[second]] * len(others)

    # Another tenant's key lists its own jobs: none of these.
    other = await new_tenant(plane, "completion-other", micro_credits=10 * CREDIT)
    theirs = await complete_in(
        "bash", environment(plane.address, other.key), f"gpuplane jobs get {common}"
    )
    assert theirs == [[]]


async def test_each_shell_completes_host_ids_from_the_api(plane: JobPlane) -> None:
    token = (await new_token(plane, plane.provider_tenant)).secret
    first = (await new_host(plane.channel, token, hostname="gpu-box-1")).host_id
    second = (await new_host(plane.channel, token)).host_id
    env = environment(plane.address, plane.admin_key)
    for shell in SHELLS:
        replies = await complete_in(
            shell,
            env,
            f"gpuplane hosts get {distinguishing_prefix(first, second)}",
            f"gpuplane hosts drain {distinguishing_prefix(second, first)}",
            f"gpuplane hosts undrain {os.path.commonprefix([first, second])}",
        )
        assert replies[0] == [first], shell
        assert replies[1] == [second], shell
        assert sorted(replies[2]) == sorted([first, second]), shell
    # fish and zsh show each id's state and hostname beside it.
    line = f"gpuplane hosts get {distinguishing_prefix(first, second)}"
    assert await drive("fish", env, line) == f"{first}\tREGISTERED gpu-box-1\n@@\n"


async def direct_completion(env: dict[str, str], line: str, out: Path) -> str:
    """Runs `gpuplane` as the completion script does, the candidates going to `out`;
    returns what it printed on stderr."""
    env = dict(env, _ARGCOMPLETE="1", COMP_LINE=line, COMP_POINT=str(len(line)))
    env["_ARGCOMPLETE_STDOUT_FILENAME"] = str(out)
    done = await asyncio.to_thread(
        subprocess.run, [str(BIN / "gpuplane")], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


async def test_a_failed_lookup_offers_nothing_and_no_traceback(
    plane: JobPlane, tmp_path: Path
) -> None:
    job = await new_job(plane, plane.consumer_key)
    out = tmp_path / "candidates"
    line = f"gpuplane jobs get {job.job_id[:-1]}"

    # The same request with the right key finds the job: the failures below are the lookups'.
    assert await direct_completion(environment(plane.address, plane.consumer_key), line, out) == ""
    assert out.read_text().split() == [job.job_id]

    failures = [
        environment(plane.address, "gpk_not_a_key"),  # UNAUTHENTICATED
        environment(f"127.0.0.1:{free_port()}", plane.consumer_key),  # nothing listening
        dict(environment(plane.address, plane.consumer_key), GPUPLANE_ENV_FILE="/nonexistent"),
        {  # TLS with a CA file that is not there
            **environment(plane.address, plane.consumer_key),
            "GPUPLANE_PLAINTEXT": "",
            "GPUPLANE_CA_FILE": "/nonexistent",
        },
    ]
    for env in failures:
        out.unlink()
        err = await direct_completion(env, line, out)
        assert "Traceback" not in err
        assert out.read_text() == "", env


def test_scripts_for_each_shell(capsys: pytest.CaptureFixture[str]) -> None:
    from gpuplane_cli.main import main

    assert main(["completion", "bash"], environ={}) == 0
    bash = capsys.readouterr().out
    assert "complete -o nospace -o default -o bashdefault -F _python_argcomplete gpuplane" in bash
    assert main(["completion", "zsh"], environ={}) == 0
    zsh = capsys.readouterr().out
    assert zsh.startswith("#compdef gpuplane\n")
    assert "compdef _python_argcomplete gpuplane" in zsh
    assert main(["completion", "fish"], environ={}) == 0
    fish = capsys.readouterr().out
    assert "complete --command gpuplane -f -a '(__fish_gpuplane_complete)'" in fish
    with pytest.raises(SystemExit) as exit_info:
        main(["completion", "tcsh"], environ={})
    assert exit_info.value.code == 2
    assert "invalid choice: 'tcsh'" in capsys.readouterr().err


def test_the_cli_starts_without_the_heavy_modules() -> None:
    """Every Tab runs the CLI: its start must not load what only some commands use."""
    probe = (
        "import sys, gpuplane_cli.main; "
        "print(sorted(m for m in ('argcomplete', 'nats', 'pydantic', 'sqlalchemy', 'docker', "
        "'minio', 'controlplane', 'daemon.agent', 'rich') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
