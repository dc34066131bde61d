"""Service settings read from the environment, with documented defaults.

Kafka connection settings live in ``stream.settings`` (the package that talks to Kafka);
this module holds what the composition root needs on top of them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# name -> (default, help). The single source for `oncotwin settings` and the README table.
ENV_VARS: dict[str, tuple[str, str]] = {
    "ONCOTWIN_DEVICE": ("auto", "torch device for simulations: auto (cuda if present), cpu, cuda, cuda:1"),
    "ONCOTWIN_DTYPE": ("float32", "floating point type of ensembles: float32 or float64"),
    "ONCOTWIN_DATA_DIR": ("data", "root for generated cohorts, the RDF store and twin state"),
    "ONCOTWIN_STATE_URL": ("", "twin state store URL: file://DIR, s3://BUCKET/PREFIX?endpoint=URL (credentials from AWS_*), memory:// (default: file under ONCOTWIN_DATA_DIR/state)"),
    "ONCOTWIN_IMAGING_ROOT": ("", "root under which imaging claim checks are resolved (default: ONCOTWIN_DATA_DIR)"),
    "ONCOTWIN_SEED": ("20261123", "seed for cohort generation in demos"),
    "ONCOTWIN_LOG_LEVEL": ("INFO", "logging level"),
}


@dataclass(frozen=True)
class Settings:
    device: str
    dtype: str
    data_dir: Path
    state_url: str
    imaging_root: Path
    seed: int
    log_level: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ

        def get(name: str) -> str:
            return env.get(name, "") or ENV_VARS[name][0]

        data_dir = Path(get("ONCOTWIN_DATA_DIR"))
        dtype = get("ONCOTWIN_DTYPE")
        if dtype not in ("float32", "float64"):
            raise ValueError(f"ONCOTWIN_DTYPE must be float32 or float64, not {dtype!r}")
        try:
            seed = int(get("ONCOTWIN_SEED"))
        except ValueError as exc:
            raise ValueError(f"ONCOTWIN_SEED must be an integer, not {get('ONCOTWIN_SEED')!r}") from exc
        return cls(
            device=get("ONCOTWIN_DEVICE"),
            dtype=dtype,
            data_dir=data_dir,
            state_url=get("ONCOTWIN_STATE_URL") or (data_dir / "state").resolve().as_uri(),
            imaging_root=Path(get("ONCOTWIN_IMAGING_ROOT") or data_dir),
            seed=seed,
            log_level=get("ONCOTWIN_LOG_LEVEL").upper(),
        )

    def as_table(self) -> list[tuple[str, str, str]]:
        """(env var, effective value, help) rows."""
        values = asdict(self)
        rows = []
        for f, name in zip(fields(self), ENV_VARS):
            rows.append((name, str(values[f.name]), ENV_VARS[name][1]))
        return rows
