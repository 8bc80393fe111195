"""Test set-up shared by every test module.

The Triton backend is tested under the Triton interpreter on CPU tensors: TRITON_INTERPRET must be
set before triton is first imported, so it is set here, before anything else. On a CUDA machine
set GMT_TEST_CUDA=1 to run the Triton kernels compiled instead.
"""

import os

if os.environ.get("GMT_TEST_CUDA") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# Every backend the behavioural suite runs on. A backend that cannot load fails its tests loudly
# (the reason is in the error): a build that lost its C++ extension must not pass quietly.
BACKENDS = ["reference", "triton", "cpu"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    from gmt_kernels.backends import resolve

    resolve(request.param, torch.device("cpu"), torch.float32)  # raises with the reason if unusable
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
