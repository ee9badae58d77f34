"""Runs pytest on the test files named on the command line (BUILD's py_test entry point)."""

import sys

import pytest

if __name__ == "__main__":
    sys.exit(pytest.main(["-q", *sys.argv[1:]]))
