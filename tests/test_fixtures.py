"""The shared test fixtures clean up after themselves: a test-only method is in the global
METHODS registry only while its fixture is active."""
from __future__ import annotations

import pytest

from engine_helpers import registered_methods, tiny_recipe
from lspretrain.engine.config import ConfigError, load_config
from lspretrain.methods import METHODS


def test_test_method_is_registered_only_inside_the_block(tmp_path):
    before = dict(METHODS)
    assert "classification_ema" not in METHODS  # importing engine_helpers registers nothing
    recipe = tiny_recipe(tmp_path, method={"name": "classification_ema"})
    with registered_methods("classification_ema"):
        assert METHODS["classification_ema"].method_class().__name__ == "ClassificationEMA"
        assert load_config(recipe).method.name == "classification_ema"
    assert dict(METHODS) == before
    with pytest.raises(ConfigError, match="classification_ema"):
        load_config(recipe)


def test_ema_method_fixture_registers_it(ema_method):
    assert ema_method == "classification_ema" and METHODS[ema_method].method_class().__name__ == "ClassificationEMA"
