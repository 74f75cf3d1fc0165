"""[alerting] in steadyserve.toml: lists become tuples, actions are checked by name."""

from __future__ import annotations

import pytest

from steadyserve.errors import ConfigError
from steadyserve.settings import load_config


def load(tmp_path, text: str):
    (tmp_path / "steadyserve.toml").write_text(text)
    return load_config(cwd=tmp_path, env={})


def test_actions_and_webhooks_are_read(tmp_path):
    cfg = load(tmp_path, """
[alerting]
webhook_urls = ["http://127.0.0.1:9/hook"]
actions = {ErrorBudgetBurn = ["shed_batch"], ReplicaErrors = []}
""").alerting
    assert cfg.webhook_urls == ("http://127.0.0.1:9/hook",)
    assert dict(cfg.actions) == {"ErrorBudgetBurn": ("shed_batch",), "ReplicaErrors": ()}


@pytest.mark.parametrize(("text", "fragment"), [
    ('actions = {X = ["launch"]}', "unknown action 'launch'"),
    ('actions = ["shed_batch"]', "table of rule"),
    ('webhook_urls = "http://x"', "must be a list"),
    ('webhook_urls = ["ftp://x"]', "http(s)://"),
    ("slo_target = 1.5", "slo_target"),
])
def test_bad_alerting_settings_are_refused(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, f"[alerting]\n{text}\n")
    assert fragment in str(info.value)
