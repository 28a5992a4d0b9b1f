"""Environments: the protocol (base), the toy task, LIBERO, the worker pool, seeding and sharding of work items."""

from __future__ import annotations

from trainer.envs.base import ACTION_DIM, PROPRIO_DIM, Env, Observation, StepResult

TOY_SUITES = ("toy",)
LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
STANDIN_SUITES = ("libero_standin",)  # LIBERO's shapes and step cost, no simulator: for GPU benchmarks only
SUITES = TOY_SUITES + LIBERO_SUITES + STANDIN_SUITES


def make_env(suite: str, **kwargs) -> Env:
    """Create one environment of `suite` ("toy" or a LIBERO suite); kwargs go to the env's constructor."""
    if suite == "toy":
        from trainer.envs.toy import ToyReachEnv

        return ToyReachEnv(**kwargs)
    if suite in LIBERO_SUITES:
        # Imported here: LIBERO pulls in robosuite and MuJoCo, which the toy path and the tests must not need.
        from trainer.envs.libero import LiberoEnv

        return LiberoEnv(suite=suite, **kwargs)
    if suite == "libero_standin":
        from trainer.envs.standin import LiberoStandInEnv

        return LiberoStandInEnv(**kwargs)
    raise ValueError(f"unknown env suite {suite!r}; valid suites: {', '.join(SUITES)}")


__all__ = [
    "ACTION_DIM",
    "LIBERO_SUITES",
    "PROPRIO_DIM",
    "SUITES",
    "TOY_SUITES",
    "Env",
    "Observation",
    "StepResult",
    "make_env",
]
