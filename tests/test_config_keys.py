"""Retired daemon config keys (nexedge.serve.config.REMOVED_KEYS): an old config still loads, with a
warning naming the new key, and means the same as the current spelling."""

import dataclasses
import logging
import os

import pytest
import yaml

from nexedge.serve import config as serve_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_EXAMPLE = os.path.join(ROOT, "tests", "data", "line.example-0.1.yaml")
EXAMPLE = os.path.join(ROOT, "nexedge", "serve", "line.example.yaml")

#: a value for each retired key that differs from its default and passes validation
SAMPLE = {
    "sockets.max_pixels": 1_000_000, "sockets.max_decoded_bytes": 64 << 20, "sockets.max_jpeg_scans": 8,
    "sockets.max_peer_pending_bytes": 8 << 20, "sockets.max_pending_bytes": 128 << 20,
    "sockets.unfinished_timeout_s": 3.0, "sockets.rss_limit": "2GiB", "metrics.max_connections": 8,
    "metrics.max_per_client": 2, "metrics.timeout_s": 2.5, "lifecycle.auto_promote_frames": 500,
    "lifecycle.auto_promote_max_disagreement": 0.02, "lifecycle.auto_promote_max_escape": 0.1,
    "lifecycle.auto_rollback_baseline": 100, "lifecycle.auto_rollback_subgroup": 50,
    "lifecycle.auto_rollback_watch": 1000, "lifecycle.auto_rollback_alpha": 0.05,
}


def _read(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_the_0_1_example_loads_with_warnings_and_gives_the_same_effective_config(caplog):
    with caplog.at_level(logging.WARNING, logger="nexedge.serve.config"):
        old = serve_config.from_dict(_read(OLD_EXAMPLE))
    warned = [r.getMessage() for r in caplog.records]
    assert warned and all("is retired; use " in w for w in warned)
    assert "config: sockets.rss_limit is retired; use sockets.guard.rss_limit (value 'auto' carried over)" in warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nexedge.serve.config"):
        new = serve_config.from_dict(_read(EXAMPLE))
    assert not caplog.records  # the current example uses the current keys
    assert dataclasses.asdict(old) == dataclasses.asdict(new)


def test_every_retired_key_is_sampled():
    assert sorted(SAMPLE) == sorted(serve_config.REMOVED_KEYS)


@pytest.mark.parametrize("old", sorted(serve_config.REMOVED_KEYS))
def test_a_retired_key_carries_its_value_to_the_new_key(old, caplog):
    new = serve_config.REMOVED_KEYS[old]
    value = SAMPLE[old]
    with caplog.at_level(logging.WARNING, logger="nexedge.serve.config"):
        cfg = serve_config.load(None, [("model.path", "m.onnx"), (old, value)])
    assert [r.getMessage() for r in caplog.records] == [f"config: {old} is retired; use {new} (value {value!r} "
                                                        "carried over)"]
    section, group, key = new.split(".")
    assert getattr(getattr(getattr(cfg, section), group), key) == value
    assert cfg == serve_config.load(None, [("model.path", "m.onnx"), (new, value)])  # the same as the new spelling


def test_a_retired_key_that_contradicts_its_new_key_is_refused():
    with pytest.raises(serve_config.ConfigError, match=r"sockets.rss_limit \(retired\) is 'off' but sockets.guard.rss_limit is "
                                            r"'auto'; keep only sockets.guard.rss_limit"):
        serve_config.from_dict({"model": {"path": "m.onnx"}, "sockets": {"rss_limit": "off", "guard": {"rss_limit": "auto"}}})


def test_errors_name_the_new_key():
    with pytest.raises(serve_config.ConfigError, match=r"^lifecycle.auto_rollback.alpha: 1.5 must be in \(0, 1\)"):
        serve_config.load(None, [("model.path", "m.onnx"), ("lifecycle.auto_rollback.alpha", 1.5)])
    with pytest.raises(serve_config.ConfigError, match=r"^sockets.guard.unfinished_timeout_s: 0.0 must be > 0"):
        serve_config.load(None, [("model.path", "m.onnx"), ("sockets.unfinished_timeout_s", 0)])
    with pytest.raises(serve_config.ConfigError, match=r"sockets.guard.rss: unknown key; expected one of"):
        serve_config.load(None, [("model.path", "m.onnx"), ("sockets.guard.rss", 1)])
