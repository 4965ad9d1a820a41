# The package version; kept equal to the Cargo workspace's (checked by python/tests/test_package.py).
__version__ = "0.1.0"
