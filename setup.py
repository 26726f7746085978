"""Build hook: ship `hf_outliertune-autoload.pth` next to the package (metadata lives in pyproject.toml).

The .pth file runs `hf_outliertune_autoload.install()` at interpreter start, so a checkpoint saved by
hf-outliertune loads correctly even when the user did not `import hf_outliertune` (see that module).
It goes to the wheel's root (site-packages) in normal builds, and into the editable wheel for `pip install -e`.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "hf_outliertune-autoload.pth"  # sorts after setuptools' __editable__*.pth, which it may rely on
PTH_LINE = "import hf_outliertune_autoload; hf_outliertune_autoload.install()\n"


class BuildPyWithAutoload(build_py):
    """`build_py` that also writes the start-up .pth file."""

    def _pth_dir(self) -> str:
        if getattr(self, "editable_mode", False):
            # Editable wheels take only their own path files from build_lib; setuptools points the `install`
            # command's install_lib at the unpacked editable wheel, whose whole tree goes into the wheel.
            return self.distribution.get_command_obj("install").install_lib or self.build_lib
        return self.build_lib

    def run(self) -> None:
        super().run()
        target = os.path.join(self._pth_dir(), PTH_NAME)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w", encoding="utf-8") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        return outputs if getattr(self, "editable_mode", False) else [*outputs, os.path.join(self.build_lib, PTH_NAME)]


setup(cmdclass={"build_py": BuildPyWithAutoload})
