"""Training memory on the CPU (mtl.core.runtime.memory_mark / training_memory): what training needs is measured even
when an earlier, higher peak (data loading, an earlier task of a continual run) came before it."""

import os

import numpy as np
import pytest
import torch

from mtl.core.runtime import memory_mark, training_memory


def _touch(mib):
    a = np.ones(int(mib * 2**20 / 8))  # ones: every page written, so resident
    return a


def test_cpu_training_memory_sees_a_smaller_peak_after_a_larger_one():
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("this system does not let a process reset its resident high-water mark")
    cpu = torch.device("cpu")
    big = _touch(300)
    del big  # an earlier peak of 300 MiB
    mark = memory_mark(cpu)
    small = _touch(80)
    used = training_memory(cpu, mark)
    del small
    assert 70 <= used["peak_mib"] <= 200, used  # the 80 MiB, not 0 (hidden by the earlier peak)
    assert "resident memory" in used["measure"]
