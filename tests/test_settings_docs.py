"""One source for settings: the README's table and .env.example list exactly the Settings fields, with their
defaults. A field added to app/config.py without its documentation (or documented with another default) fails
here, not in a user's deployment."""

from __future__ import annotations

import re
from typing import Any

from app.config import Settings, _env_name, settings_table
from tests.utils import REPO_ROOT

# Set by the stack itself (compose.yaml and the image), so .env.example does not offer them.
FIXED_BY_THE_STACK = {"RERANKER_MODEL_PATH", "RERANKER_HOST", "RERANKER_PORT", "PROMETHEUS_MULTIPROC_DIR"}
# Settings for tests and benchmarks only, documented in the README but not offered to deployments.
NOT_FOR_DEPLOYMENTS = {
    "RERANKER_BACKEND",
    "RERANKER_SIMULATED_LAUNCHES",
    "RERANKER_SIMULATED_LAUNCH_US",
    "RERANKER_SIMULATED_TOKEN_US",
}


def documented_default(field: Any) -> str:
    default = field.default
    if default is None:
        return "(unset)"
    value = getattr(default, "value", default)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def settings() -> dict[str, str]:
    return {
        _env_name(name): ("(required)" if field.is_required() else documented_default(field))
        for name, field in Settings.model_fields.items()
    }


def test_readme_table_is_the_one_the_settings_write() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    start = readme.index("<!-- settings table:")
    block = readme[readme.index("\n", start) + 1 : readme.index("<!-- end of settings table -->")].strip()
    assert block == settings_table(), "regenerate it: python -m app.config"
    rows = dict(re.findall(r"^\| `((?:RERANKER|WEB|PROMETHEUS)_[A-Z_]+)` \| `?([^|`]+?)`? \|", block, re.M))
    assert rows == settings()  # every field, with its default


def test_env_example_offers_every_deployment_setting_with_its_default() -> None:
    text = (REPO_ROOT / ".env.example").read_text()
    offered = dict(re.findall(r"^# ((?:RERANKER|WEB)_[A-Z_]+)=(.*)$", text, re.M))
    expected = {
        name: default for name, default in settings().items() if name not in FIXED_BY_THE_STACK | NOT_FOR_DEPLOYMENTS
    }
    missing = set(expected) - set(offered)
    assert not missing, missing
    for name, default in expected.items():
        assert offered[name] in {default, "" if default == "(unset)" else default}, (name, offered[name], default)
