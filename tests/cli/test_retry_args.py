"""`jobs submit` retry flags: --max-retries left out leaves the field unset (the control plane
then retries twice), an explicit 0 is kept, --retry-on-exit-code repeats."""

from __future__ import annotations

from tests.cli.test_args import spec_of


def test_max_retries_unset_unless_given() -> None:
    assert not spec_of("--image", "busybox").HasField("max_retries")
    spec = spec_of("--image", "busybox", "--max-retries", "0")
    assert spec.HasField("max_retries")
    assert spec.max_retries == 0


def test_retry_on_exit_code_repeats() -> None:
    spec = spec_of("--image", "busybox", "--retry-on-exit-code", "3", "--retry-on-exit-code", "75")
    assert list(spec.retry_on_exit_codes) == [3, 75]
    assert list(spec_of("--image", "busybox").retry_on_exit_codes) == []
