"""Builds libkvvm.so with cargo (through setuptools-rust) and bundles it inside the ``kvvm``
package as ``kvvm/libkvvm*.so``, next to the pure-Python ctypes binding.

The Rust workspace is this directory's parent: ``pip install ./python`` and ``pip wheel ./python``
build in place, so the relative manifest path below resolves. (An sdist built from this directory
alone does not contain the Rust sources and cannot be built.)
"""

from pathlib import Path

from setuptools import setup
from setuptools_rust import Binding, RustExtension

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70
    from wheel.bdist_wheel import bdist_wheel

# The Cargo package whose cdylib is libkvvm.so, as a manifest path relative to this file.
# This is the one place that names it.
CARGO_MANIFEST = "../capi/clib/Cargo.toml"

if not (Path(__file__).resolve().parent / CARGO_MANIFEST).is_file():
    raise SystemExit(
        f"kvvm: {CARGO_MANIFEST} not found next to python/; build the package from a checkout of "
        "the kvvm repository (pip install ./python)"
    )


class PlatformWheel(bdist_wheel):
    """The library is a plain C ABI loaded by ctypes: the wheel fits every Python 3 on the
    platform (tag ``py3-none-<platform>``), not only the interpreter that built it."""

    def get_tag(self):
        _, _, platform = super().get_tag()
        return "py3", "none", platform


setup(
    cmdclass={"bdist_wheel": PlatformWheel},
    rust_extensions=[
        # A plain C-ABI cdylib (no Python module inside): ctypes loads it at first use.
        RustExtension(
            "kvvm.libkvvm",
            path=CARGO_MANIFEST,
            binding=Binding.NoBinding,
            debug=False,
            py_limited_api=False,
        )
    ],
)
