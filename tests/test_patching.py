"""One patching utility for every wrapper ditscope installs: exact restore, newest first, and a clear
error instead of silently dropping somebody else's wrapper."""

import pytest
import torch
import torch.nn.functional as F

from ditscope.errors import DitscopeError
from ditscope.patching import Patches, read_timestep, timestep_argument


def test_a_class_method_shows_through_again_and_an_own_attribute_comes_back():
    layer = torch.nn.Linear(2, 2)
    assert "forward" not in vars(layer)
    with Patches() as patches:
        original = patches.wrap(layer, "forward", lambda f: lambda x: f(x) * 0)
        assert torch.equal(layer(torch.ones(1, 2)), torch.zeros(1, 2))
    assert "forward" not in vars(layer)  # nothing left on the instance
    own = lambda x: x  # noqa: E731
    layer.forward = own
    with Patches() as patches:
        patches.set(layer, "forward", lambda x: -x)
    assert layer.forward is own
    assert callable(original)


def test_library_functions_are_restored_newest_first():
    sdpa = F.scaled_dot_product_attention
    outer, inner = Patches(), Patches()
    outer.set(F, "scaled_dot_product_attention", lambda *a, **k: "outer")
    inner.set(F, "scaled_dot_product_attention", lambda *a, **k: "inner")
    inner.restore()
    assert F.scaled_dot_product_attention() == "outer"
    outer.restore()
    assert F.scaled_dot_product_attention is sdpa


def test_restoring_under_someone_elses_wrapper_is_refused_and_changes_nothing():
    sdpa = F.scaled_dot_product_attention
    ours = Patches()
    ours.set(F, "scaled_dot_product_attention", lambda *a, **k: "ours")
    theirs = lambda *a, **k: "theirs"  # noqa: E731
    F.scaled_dot_product_attention = theirs
    try:
        with pytest.raises(DitscopeError, match="replaced by someone else"):
            ours.restore()
        assert F.scaled_dot_product_attention is theirs and len(ours) == 1
    finally:
        F.scaled_dot_product_attention = sdpa


def test_one_timestep_reader_for_keyword_and_positional_calls():
    def forward(hidden_states, encoder_hidden_states=None, timestep=None):
        pass

    position = timestep_argument(forward)
    assert position == 2
    assert read_timestep((1, 2, 3), {}, position) == 3
    assert read_timestep((1,), {"timestep": 7}, position) == 7
    assert read_timestep((1,), {}, position) is None
    assert timestep_argument(lambda x, t: None) is None
