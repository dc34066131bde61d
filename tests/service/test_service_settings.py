"""Worker settings from the environment: defaults, the twin's presentation switch, bad values."""

from __future__ import annotations

import pytest

from stream.worker import WorkerSettings


def test_defaults_and_the_engine_they_make() -> None:
    settings = WorkerSettings.from_env({"ONCOTWIN_STATE_URL": "memory://"})
    config = settings.engine_config()
    assert (config.n_members, config.filter, config.horizons) == (32, "etkf", (30.0, 60.0, 90.0, 180.0))
    assert config.twin.presentation is False


@pytest.mark.parametrize("text, on", [("on", True), ("TRUE", True), ("1", True), ("off", False), ("no", False)])
def test_presentation_switch_reaches_the_twin(text: str, on: bool) -> None:
    settings = WorkerSettings.from_env({"ONCOTWIN_STATE_URL": "memory://", "ONCOTWIN_TWIN_PRESENTATION": text})
    assert settings.engine_config().twin.presentation is on


def test_a_bad_value_names_the_setting() -> None:
    with pytest.raises(ValueError, match="ONCOTWIN_TWIN_PRESENTATION"):
        WorkerSettings.from_env({"ONCOTWIN_TWIN_PRESENTATION": "maybe"})
    with pytest.raises(ValueError, match="invalid worker setting"):
        WorkerSettings.from_env({"ONCOTWIN_ENSEMBLE_MEMBERS": "many"})
