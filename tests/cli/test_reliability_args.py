"""`jobs submit --min-reliability PERCENT`: the spec's min_reliability_permille, 0 unless given."""

from __future__ import annotations

import pytest

from gpuplane_cli.main import main
from tests.cli.test_args import spec_of


@pytest.mark.parametrize(("value", "permille"), [("95", 950), ("99.5%", 995), ("100", 1000)])
def test_min_reliability_is_per_mille_in_the_spec(value: str, permille: int) -> None:
    spec = spec_of("--image", "busybox", "--min-reliability", value)
    assert spec.min_reliability_permille == permille
    assert spec_of("--image", "busybox").min_reliability_permille == 0


@pytest.mark.parametrize("value", ["101", "-1", "99.55", "high"])
def test_bad_min_reliability_is_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["jobs", "submit", "--image", "busybox", "--min-reliability", value], environ={})
    assert exit_info.value.code == 2
    assert "--min-reliability" in capsys.readouterr().err
