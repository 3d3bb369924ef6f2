"""Make this checkout's fourbit importable in the vLLM venv without building it again.

`pip install -e .` would rebuild fourbit._C in place (python/fourbit/_C*.so), under the
main venv's feet. The vLLM venv has the same torch and Python, so it can use that build as
it is: this script (run with the vLLM venv's python) writes into its site-packages

- fourbit-dev.pth: the checkout's python/ on sys.path, and a finder for fourbit.kernels,
  which lives in the top-level kernels/ (setup.py maps it the same way);
- fourbit-<version>.dist-info: the package's metadata and pyproject.toml's entry points, so
  that vLLM finds the "vllm.general_plugins" entry point (importlib.metadata reads it).

Run again after pyproject.toml changes; it replaces what it wrote.
"""

from __future__ import annotations

import shutil
import site
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]

FINDER = '''"""fourbit.kernels from {kernels} (written by tests/vllm/install_fourbit.py)."""
import importlib.util
import sys

KERNELS = {kernels!r}


class _KernelsFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "fourbit.kernels":
            return None
        return importlib.util.spec_from_file_location(name, KERNELS + "/__init__.py",
                                                      submodule_search_locations=[KERNELS])


if _KernelsFinder not in sys.meta_path:
    sys.meta_path.append(_KernelsFinder)
'''


def main() -> None:
    built = sorted((ROOT / "python" / "fourbit").glob("_C*.so"))
    if not built:
        sys.exit("python/fourbit/_C*.so is not built: run `make test` (it builds fourbit in .venv) first")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    target = Path(site.getsitepackages()[0])
    for old in target.glob(f"{name}-*.dist-info"):
        shutil.rmtree(old)
    (target / "_fourbit_dev_finder.py").write_text(FINDER.format(kernels=str(ROOT / "kernels")))
    (target / "fourbit-dev.pth").write_text(f"{ROOT / 'python'}\nimport _fourbit_dev_finder\n")
    info = target / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("tests/vllm/install_fourbit.py\n")
    lines = []
    for group, points in project.get("entry-points", {}).items():
        lines += [f"[{group}]", *(f"{k} = {v}" for k, v in points.items()), ""]
    if "scripts" in project:
        lines += ["[console_scripts]", *(f"{k} = {v}" for k, v in project["scripts"].items()), ""]
    (info / "entry_points.txt").write_text("\n".join(lines))
    (info / "RECORD").write_text("")
    groups = sorted(project.get("entry-points", {}))
    print(f"fourbit {version} from {ROOT / 'python'} in {target} (entry points: {groups})")


if __name__ == "__main__":
    main()
