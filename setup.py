"""Only the C part of the build; everything else is in pyproject.toml.

netbootd.tftp._pump is optional: without a C compiler and the Python headers the
install still succeeds and TFTP transfers run on the Python engine (slower; the
daemon logs a warning at start). setup.sh installs gcc and python3-dev.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("netbootd.tftp._pump", ["netbootd/tftp/_pump.c"],
                             extra_compile_args=["-O2", "-Wall"], optional=True)])
