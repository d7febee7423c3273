"""Only the C part of the build; everything else is in pyproject.toml.

netbootd.tftp._pump is the TFTP block loop (the only one: every transfer runs in it),
so it is required: the build needs a C compiler and the Python headers (setup.sh
installs gcc, libc6-dev and python3-dev; the Containerfile does the same for its build).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("netbootd.tftp._pump", ["netbootd/tftp/_pump.c"],
                             extra_compile_args=["-O2", "-Wall"])])
