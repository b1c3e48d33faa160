"""Job files: the spec they describe equals `jobs submit`'s, and every mistake is reported as
FILE:LINE: FIELD: message with nothing submitted."""

from __future__ import annotations

import argparse
import socket
import textwrap
from pathlib import Path

import pytest
from gpuplane.v1 import types_pb2

from gpuplane_cli.apply import EPILOG, server_error, submit_args
from gpuplane_cli.client import Context
from gpuplane_cli.jobfile import JobFile, JobFileError, load
from gpuplane_cli.jobs import build_spec
from gpuplane_cli.main import main
from tests.cli.test_args import spec_of

FULL = """\
image: pytorch/pytorch:2.4.0
entrypoint: /bin/sh
command: [python, -c, "print('--')"]
gpus: 2
gpu_models: [H100, A100-80GB]
min_vram: 40
min_compute_capability: 8.0
cpus: 0.5
memory: 16g
shm_size: 1g
max_duration: 10m
max_price: 2.5
budget: 0.000001
env: {A: 1, B: x=y}
labels: [team=ml]
inputs:
  - data/train.csv:train.csv
  - {key: sets/val.bin, path: val.bin}
network: true
host_labels: {tier: gold}
locations: eu-west
min_reliability: 99.5
priority: -3
placement: spread
max_retries: 0
retry_on_exit_codes: [3, 75]
allow_simulated: false
allow_unverified: yes
"""

FLAGS = (
    "--image", "pytorch/pytorch:2.4.0", "--entrypoint", "/bin/sh",
    "--gpus", "2", "--gpu-model", "H100", "--gpu-model", "A100-80GB",
    "--min-vram", "40", "--min-compute-capability", "8.0", "--cpus", "0.5",
    "--memory", "16g", "--shm-size", "1g", "--max-duration", "10m",
    "--max-price", "2.5", "--budget", "0.000001", "--env", "A=1", "--env", "B=x=y",
    "--label", "team=ml", "--input", "data/train.csv:train.csv", "--input", "sets/val.bin:val.bin",
    "--network", "--host-label", "tier=gold", "--location", "eu-west",
    "--min-reliability", "99.5", "--priority", "-3", "--placement", "spread",
    "--max-retries", "0", "--retry-on-exit-code", "3", "--retry-on-exit-code", "75",
    "--no-allow-simulated", "--allow-unverified", "--", "python", "-c", "print('--')",
)  # fmt: skip


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def spec_from_file(path: str, environ: dict[str, str] | None = None) -> types_pb2.JobSpec:
    args = argparse.Namespace(dry_run=False, wait=False, idempotency_key="")
    submitted = submit_args(load(path), args)
    return build_spec(submitted, Context(args=args, environ=environ or {}))


def errors_of(path: str) -> list[str]:
    with pytest.raises(JobFileError) as caught:
        load(path)
    return [str(error) for error in caught.value.errors]


def test_every_field_gives_the_spec_of_the_same_flags(tmp_path: Path) -> None:
    from_file = spec_from_file(write(tmp_path, FULL))
    assert from_file == spec_of(*FLAGS)
    assert from_file.max_price_per_gpu_hour_micro_credits == 2_500_000
    assert from_file.min_reliability_permille == 995
    assert from_file.min_compute_capability == "8.0"  # as written, not the float 8.0


def test_defaults_are_those_of_jobs_submit(tmp_path: Path) -> None:
    path = write(tmp_path, "image: busybox\ncommand: echo 'hello world'\n")
    env = {"GPUPLANE_ALLOW_SIMULATED": "1"}
    from_file = spec_from_file(path, env)
    assert from_file == spec_of("--image", "busybox", "--", "echo", "hello world", environ=env)
    assert from_file.max_duration_seconds == 3600
    assert not from_file.HasField("max_retries")
    assert from_file.allow_simulated


def test_unknown_field_suggests_the_nearest(tmp_path: Path) -> None:
    path = write(tmp_path, "image: busybox\n\nmax_retires: 2\nzzz: 1\n")
    assert errors_of(path) == [
        f"{path}:3: max_retires: unknown field; did you mean `max_retries`?",
        f"{path}:4: zzz: unknown field (the fields are: image, command, entrypoint, gpus, "
        "gpu_models, min_vram, min_compute_capability, cpus, memory, shm_size, max_duration, "
        "max_price, budget, env, labels, inputs, network, host_labels, locations, "
        "min_reliability, priority, placement, max_retries, retry_on_exit_codes, "
        "allow_simulated, allow_unverified)",
    ]


def test_wrong_types_name_the_field_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        image: busybox
        gpus: "2"
        network: 1
        env: [A=1, [x]]
        priority: 1.5
        max_retries: -1
        command: {a: b}
        """,
    )
    assert errors_of(path) == [
        f"{path}:2: gpus: expected a whole number, got the text '2'",
        f"{path}:3: network: expected true or false, got the number '1'",
        f"{path}:4: env: expected a string, got a list",
        f"{path}:5: priority: expected a whole number, got the number '1.5'",
        f"{path}:6: max_retries: -1 must not be negative",
        f"{path}:7: command: expected a string, got a mapping",
    ]


def test_bad_units_use_the_flags_messages(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        image: busybox
        max_duration: 10 minutes
        max_price: 2.5000001
        memory: 16q
        cpus: 0
        min_reliability: 101
        placement: nearest
        budget: ~
        """,
    )
    assert errors_of(path) == [
        f"{path}:2: max_duration: '10 minutes' is not a duration (e.g. 90, 45s, 10m, 2h, 1h30m)",
        f"{path}:3: max_price: '2.5000001' has more than 6 decimal places "
        "(1 micro-credit = 0.000001)",
        f"{path}:4: memory: '16q' is not a size (e.g. 512m, 4g, 16GiB)",
        f"{path}:5: cpus: '0': must be more than 0",
        f"{path}:6: min_reliability: '101' must be between 0 and 100 with one decimal at most",
        f"{path}:7: placement: 'nearest' is not one of: cheapest, balanced, pack, spread",
        f"{path}:8: budget: expected a value, got nothing",
    ]


def test_missing_image_and_empty_or_odd_files(tmp_path: Path) -> None:
    path = write(tmp_path, "# a comment\ngpus: 1\n")
    assert errors_of(path) == [f"{path}:2: image: is required"]
    empty = write(tmp_path, "# nothing\n", "empty.yaml")
    assert errors_of(empty) == [f"{empty}:1: empty: a job file needs at least `image`"]
    listing = write(tmp_path, "\n- image: busybox\n", "list.yaml")
    assert errors_of(listing) == [
        f"{listing}:2: expected a mapping of fields (image: ..., gpus: ...), got a list"
    ]
    missing = str(tmp_path / "missing.yaml")
    assert errors_of(missing) == [f"{missing}: cannot read: No such file or directory"]


def test_duplicate_keys_and_yaml_syntax(tmp_path: Path) -> None:
    path = write(tmp_path, "image: busybox\ngpus: 1\nlabels:\n  a: x\n  a: y\ngpus: 2\n")
    assert errors_of(path) == [
        f"{path}:5: labels: duplicate key 'a' (first on line 4)",
        f"{path}:6: gpus: duplicate field (first on line 2)",
    ]
    broken = write(tmp_path, "image: busybox\nenv: {A: 1\ngpus: 1\n", "broken.yaml")
    [message] = errors_of(broken)
    assert message.startswith(f"{broken}:3: not valid YAML: expected ',' or '}}'")


def test_list_items_and_inputs_point_at_their_own_line(tmp_path: Path) -> None:
    (tmp_path / "here.bin").write_bytes(b"x")
    path = write(
        tmp_path,
        """\
        image: busybox
        retry_on_exit_codes:
          - 3
          - seventy
        inputs:
          - ./here.bin:in/here.bin
          - {key: ./missing.bin}
        """,
    )
    assert errors_of(path) == [
        f"{path}:4: retry_on_exit_codes: expected a whole number, got the text 'seventy'",
        f"{path}:7: inputs: ./missing.bin: no such file (relative to {path})",
    ]
    bad_input = write(tmp_path, "image: busybox\ninputs:\n  - {key: a, where: b}\n", "in.yaml")
    assert errors_of(bad_input) == [
        f"{bad_input}:3: inputs: unknown input field 'where' (an input has `key` and `path`)"
    ]


def test_local_inputs_are_found_beside_the_job_file(tmp_path: Path) -> None:
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "data.bin").write_bytes(b"x")
    path = write(folder, "image: busybox\ninputs: [./data.bin:in/d.bin, sets/a]\n")
    assert load(path).options["input"] == [f"{folder / 'data.bin'}:in/d.bin", "sets/a"]


def test_server_errors_map_back_to_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        image: busybox
        env:
          GOOD: 1
          NVIDIA_VISIBLE_DEVICES: all
        labels: [a=1, "b c=2"]
        inputs:
          - sets/a
          - /etc/passwd
        """,
    )
    job = load(path)

    def mapped(details: str) -> str:
        error = server_error(job, details)
        assert error is not None
        return str(error)

    assert mapped("spec.env['NVIDIA_VISIBLE_DEVICES']: is set by the daemon") == (
        f"{path}:4: env: is set by the daemon"
    )
    assert mapped("spec.labels['b c']: bad key") == f"{path}:5: labels: bad key"
    assert mapped("spec.inputs[1].path: must be relative") == f"{path}:8: inputs: must be relative"
    assert mapped("spec.image: not valid") == f"{path}:1: image: not valid"
    assert mapped("spec.max_duration_seconds: longer than 30 days") == (
        f"{path}: max_duration: longer than 30 days"  # not in the file: its default
    )
    assert server_error(job, "reason: at most 500 characters") is None
    assert server_error(job, "spec.unknown_field: x") is None


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_apply_with_mistakes_submits_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "image: busybox\ngpu: 1\nmax_price: cheap\n")
    # A control plane is never called: it is not there (that would be exit 7, UNAVAILABLE).
    environ = {"GPUPLANE_ADDR": f"127.0.0.1:{_closed_port()}", "GPUPLANE_PLAINTEXT": "1"}
    code = main(["apply", path], environ=environ)
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err == (
        f"error: {path}:2: gpu: unknown field; did you mean `gpus`?\n"
        f"error: {path}:3: max_price: 'cheap' is not a decimal amount of credits (e.g. 2.5)\n"
    )
    assert "Traceback" not in captured.err


def test_apply_takes_no_command_after_dashes(tmp_path: Path) -> None:
    path = write(tmp_path, "image: busybox\n")
    with pytest.raises(SystemExit) as caught:
        main(["apply", path, "--", "echo"], environ={})
    assert caught.value.code == 2


def test_job_file_keeps_where_each_field_is(tmp_path: Path) -> None:
    job: JobFile = load(write(tmp_path, "\n\nimage: busybox\ngpus: 1\n"))
    assert job.error("gpus", "x").line == 4
    assert job.error("memory", "x").line is None


@pytest.mark.parametrize("source", ["README.md", "help"])
def test_the_documented_examples_are_valid_job_files(tmp_path: Path, source: str) -> None:
    if source == "README.md":
        readme = (Path(__file__).parents[2] / "README.md").read_text()
        example = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    else:
        example = textwrap.dedent(EPILOG.split("\n\n")[1])
    for name in ("config.json", "local.bin"):
        (tmp_path / name).write_text("{}")
    spec = spec_from_file(write(tmp_path, example))
    assert spec.gpu_count == 2
    assert spec.max_price_per_gpu_hour_micro_credits == 2_500_000
    assert list(spec.retry_on_exit_codes) == [75]
