"""The LIF benchmark's roofline arithmetic (the timings themselves are not tested)."""
import pytest

from benchmarks.lif import ROOFLINE_PASSES, add_roofline, copy_bandwidth


def test_roofline_is_five_passes_of_the_input_at_the_copy_bandwidth():
    rows = [{"fwd_bwd_ms_min": 10.0}, {"fwd_bwd_ms_min": 2.5}]
    add_roofline(rows, nbytes=4_000_000, bandwidth=10e9)  # 5 x 4 MB at 10 GB/s = 2 ms
    assert ROOFLINE_PASSES == 5
    assert [r["roofline_ms"] for r in rows] == [2.0, 2.0]
    assert [r["roofline_fraction"] for r in rows] == [0.2, 0.8]
    assert rows[0]["copy_GBps"] == 10.0


def test_copy_bandwidth_on_cpu_is_a_plausible_rate():
    bandwidth = copy_bandwidth(8 * 2**20, "cpu", repeats=3)
    assert 1e8 < bandwidth < 1e13, bandwidth  # between 0.1 GB/s and 10 TB/s
