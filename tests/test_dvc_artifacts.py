"""bench/dvc_artifacts.py on a small model: linked outputs, a fast no-op repro, a remote."""

import importlib.util

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("dvc_artifacts", ROOT / "bench/dvc_artifacts.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.mark.slow
def test_large_output_is_linked_and_cheap_to_recheck(tmp_path):
    # ~0.13 GB (vocab 32,000 × 1,024 + 2 blocks in bf16); `make bench`-style runs use 2 GB.
    shrink = {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 4096}
    r = bench.measure(2, tmp_path, shrink=shrink)  # asserts no-op repros run nothing
    assert r["bytes"] > 100e6
    assert r["link"] == r["checkout_link"] == "hardlink"  # one copy on disk, never two
    assert r["noop_repro_s"] <= 3 and r["pull_noop_repro_s"] <= 3
