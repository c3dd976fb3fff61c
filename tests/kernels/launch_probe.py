"""A stub Triton driver for launch tests: real kernels compiled for sm_90a in a fresh process
without the interpreter, launched by a launcher that records its arguments instead of running.

``run_probe(body)`` runs ``STUB + body`` in a subprocess (the suite itself runs under
``TRITON_INTERPRET=1``) and returns the JSON the body prints last. The stub defines ``launched``
(a list of ``(kernel name, launcher args)``), ``describe(arg)`` (launcher arguments as comparable
data) and activates the stub driver.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

STUB = r'''
import json
from unittest import mock

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime import jit as triton_jit

launched = []


class Utils:
    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132}

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 64, 0, 1024


class Driver:
    utils = Utils()

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 7

    def launcher_cls(self, src, metadata):
        name = metadata.name
        return lambda *args: launched.append((name, args))


def describe(arg):
    """A launcher argument as comparable data (tensors by identity, descriptors by fields)."""
    if isinstance(arg, torch.Tensor):
        return ["tensor", id(arg)]
    if type(arg).__name__ == "TensorDescriptor":
        return ["desc", id(arg.base), list(arg.shape), list(arg.strides), list(arg.block_shape)]
    if isinstance(arg, tuple):
        return [describe(a) for a in arg]
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg
    if isinstance(arg, bytes):
        return arg.hex()
    return ["object", id(arg)]


triton.runtime.driver.set_active(Driver())
'''


def run_probe(body: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-c", STUB + body], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
