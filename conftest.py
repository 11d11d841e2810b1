"""Shared by every test file: torch runs on one thread.

The models in the tests are small, and on a busy machine OpenMP threads wait on each other: the
Trainer tests of tests/test_srlora_hf.py took 20-70 s each under a load of about 14 on 2 cores, and
1-5 s with one thread.  Subprocess tests set OMP_NUM_THREADS=1 themselves.
"""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
