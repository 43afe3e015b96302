"""backends/compile_cache.py: a file carries what it was made for, and a server told to load a
file made with other shapes says so (on the H200 such a file silently cost a cold compile)."""

from __future__ import annotations

import lzma
import pickle

import pytest

from paiton.backends.compile_cache import (CONFIGURATION_KEYS, SHAPE_KEYS, cache_mismatches, load_compile_cache,
                                           save_compile_cache)


def test_made_for_survives_the_round_trip_and_old_files_still_load(tmp_path):
    made_for = dict(model="qwen3-32b", backend="paiton", max_slots=128, max_model_len=1472)
    path = tmp_path / "cache.xz"
    save_compile_cache(str(path), [], made_for)
    assert load_compile_cache(str(path)) == made_for
    # A file from before made_for: a bare list of artifact blobs (here none).
    with lzma.open(tmp_path / "old.xz", "wb") as f:
        pickle.dump([], f)
    assert load_compile_cache(str(tmp_path / "old.xz")) == {}
    with lzma.open(tmp_path / "bad.xz", "wb") as f:
        pickle.dump({"artifacts": ["not bytes"]}, f)
    with pytest.raises(ValueError, match="not a file save_compile_cache wrote"):
        load_compile_cache(str(tmp_path / "bad.xz"))


def test_mismatches_tell_another_configuration_from_other_shapes():
    made = dict(model="qwen3-32b", backend="paiton", fp8=False, max_slots=128, max_model_len=1472, torch="2.11")
    assert cache_mismatches(made, dict(made, torch="2.13")) == ([], [])  # not a key that decides the graphs
    configuration, shapes = cache_mismatches(made, dict(made, max_model_len=1280))
    assert configuration == [] and shapes == ["max_model_len 1472 (here 1280)"]
    configuration, _ = cache_mismatches(made, dict(made, backend="inductor", max_slots=32))
    assert configuration == ["backend 'paiton' (here 'inductor')"]
    assert cache_mismatches({}, made) == ([], [])  # a file that says nothing is not judged


def test_the_server_records_every_key_the_check_reads():
    """paiton serve's record (cli._compile_cache_key) holds each key cache_mismatches compares:
    a key it left out would never be checked."""
    from paiton import cli

    args = cli.build_parser().parse_args(["serve", "--model", "tiny", "--max-slots", "4"])
    key = cli._compile_cache_key(args, "cpu", {})
    assert set(CONFIGURATION_KEYS) | set(SHAPE_KEYS) <= set(key)
    assert key["max_slots"] == 4 and key["model"] == "tiny" and key["tensor_parallel"] == 1
