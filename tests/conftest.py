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


# The test files that take longest (seconds of a 2-core CI run, 2026-12-06), handed to the two workers first so
# that they end together: xdist's default order (most tests first) started the slowest file, the documents'
# commands, last, and left one worker idle for 6 minutes. Files not named follow in their own order.
SLOWEST_FIRST = {
    "test_docs.py": 488,
    "test_parallel.py": 363,
    "test_cli.py": 267,
    "test_zoo.py": 163,
    "test_tune.py": 144,
    "test_plan.py": 143,
    "test_bench.py": 140,
    "test_study.py": 108,
    "test_peers.py": 78,
}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -SLOWEST_FIRST.get(item.path.name, 0))  # stable: a file's own order is kept
