import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER" in os.environ:  # two workers on two cores: one thread each, not two threads each
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def default_pipe():
    """The built-in default pipeline (random-init PixArt), built once per session."""
    from ditscope import zoo

    return zoo.load(zoo.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def call_kwargs():
    from ditscope import zoo

    return zoo.ZOO[zoo.DEFAULT_MODEL].call_kwargs


@pytest.fixture
def prompts():
    from ditscope import zoo

    return zoo.builtin_prompts()[:3]


torch.set_num_threads(1 if "PYTEST_XDIST_WORKER" in os.environ else min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """Single-threaded torch for the test: what makes two runs bit-identical (with several threads, CPU
    kernels may split sums differently from run to run and differ in the last bits, ~1e-7 relative)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
