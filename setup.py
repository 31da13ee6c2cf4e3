"""Install ``hf_to_hook.pth`` (the start-up hook of hf-to) into site-packages.

All metadata is in pyproject.toml; this file only extends ``build_py`` so that the ``.pth``
file lands at the root of site-packages for a wheel (``pip install .``) and for an editable
install (``pip install -e .``, PEP 660), where setuptools writes non-package files straight
into the unpacked editable wheel (``install_lib``).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "hf_to_hook.pth"


class build_py_with_pth(build_py):
    def run(self) -> None:
        super().run()
        source = str(Path(__file__).parent / PTH)
        if getattr(self, "editable_mode", False):
            # editable_wheel points install_lib at the unpacked wheel, i.e. site-packages.
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        self.copy_file(source, str(Path(target, PTH)), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outputs.append(str(Path(self.build_lib, PTH)))
        return outputs


setup(cmdclass={"build_py": build_py_with_pth})
