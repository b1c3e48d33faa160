"""`gpuplane nats init` writes seeds the control plane accepts and a matching server include;
settings refuse partial or wrong-role seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from controlplane.settings import Settings
from gpuplane_cli.main import main
from messaging.natsjwt import ACCOUNT, USER, new_seed


def read_env(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def test_init_writes_seeds_and_include(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys_dir = tmp_path / "keys"
    assert main(["nats", "init", "--dir", str(keys_dir)], environ={}) == 0
    env_file = keys_dir / "controlplane-nats.env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    env = read_env(env_file)
    options: dict[str, Any] = {k.removeprefix("GPUPLANE_").lower(): v for k, v in env.items()}
    settings = Settings(**options)
    keys = settings.nats_keys()
    assert keys is not None
    include = (keys_dir / "nats-auth.conf").read_text()
    assert f"system_account: {keys.system_account}" in include
    assert f"  {keys.account}: " in include
    for seed in (keys.operator_seed, keys.account_seed, keys.system_account_seed):
        assert seed not in include  # the server config holds public JWTs only

    # A second run would orphan every registered host: refused unless forced.
    assert main(["nats", "init", "--dir", str(keys_dir)], environ={}) == 2
    assert "--force" in capsys.readouterr().err
    assert read_env(env_file) == env
    assert main(["nats", "init", "--dir", str(keys_dir), "--force"], environ={}) == 0
    assert read_env(env_file) != env


def test_settings_refuse_partial_or_wrong_seeds() -> None:
    assert Settings().nats_keys() is None
    with pytest.raises(ValidationError, match="set together"):
        Settings(nats_account_seed=new_seed(ACCOUNT))
    with pytest.raises(ValidationError, match="nats_operator_seed must be an nkey seed"):
        Settings(
            nats_operator_seed=new_seed(USER),
            nats_account_seed=new_seed(ACCOUNT),
            nats_system_account_seed=new_seed(ACCOUNT),
        )
