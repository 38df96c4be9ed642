"""Build hook: ship `feallm_llava_autoload.pth` at the top of site-packages.

The .pth file makes unmodified upstream entry points (`python -m llava.serve.model_worker`)
see the `feallm` projector: at start-up it imports `feallm_llava`, which only arms a lazy
import hook (no torch). `FEALLM_LLAVA_AUTOLOAD=0` turns it off. Everything else is in
setup.cfg.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "feallm_llava_autoload.pth"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": build_py_with_pth})
