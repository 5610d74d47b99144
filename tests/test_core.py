"""Core: Transform / identity / chain semantics and (regex, value) selection rules."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.core import (
    DEFAULT_RULES,
    Transform,
    chain,
    explain,
    format_decisions,
    identity,
    leaf_names,
    select,
    update_info,
)
from jaxcompress.core.rules import is_none
from jaxcompress.prune import pruning
from jaxcompress.quant import fake_quant, weight_quantization


# ---------------------------------------------------------------------------------------------
# Helpers: tiny hand-checkable transforms that record what they saw.
# ---------------------------------------------------------------------------------------------


def _scale_transform(factor):
    """apply multiplies every leaf by ``factor``; the state records the sum of what init/update saw."""

    def init(params):
        return jnp.asarray(sum(float(jnp.sum(x)) for x in jax.tree.leaves(params)), jnp.float32)

    def apply(params, state):
        del state
        return jax.tree.map(lambda x: x * factor, params)

    def update(params, state, info):
        del state, info
        return jnp.asarray(sum(jnp.sum(x) for x in jax.tree.leaves(params)), jnp.float32)

    return Transform(init, apply, update)


def _add_transform(offset):
    def init(params):
        del params
        return jnp.zeros((), jnp.int32)

    def apply(params, state):
        del state
        return jax.tree.map(lambda x: x + offset, params)

    def update(params, state, info):
        del params, info
        return state + 1

    return Transform(init, apply, update)


def _rng_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "Dense_0": {
            "kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
        },
        "Dense_1": {
            "kernel": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
        },
    }


# ---------------------------------------------------------------------------------------------
# identity / chain
# ---------------------------------------------------------------------------------------------


def test_identity_returns_params_unchanged_and_state_unchanged():
    p = {"w": jnp.array([[1.0, -2.0], [3.5, 0.0]]), "b": jnp.array([7.0])}
    t = identity()
    s = t.init(p)
    out = t.apply(p, s)
    np.testing.assert_array_equal(out["w"], [[1.0, -2.0], [3.5, 0.0]])
    np.testing.assert_array_equal(out["b"], [7.0])
    assert t.update(p, s, update_info(3)) == s
    assert isinstance(t, Transform) and isinstance(t, tuple) and len(t) == 5
    assert t.intercept is None  # changes no layer at run time
    assert t.describe(p, s) == {}


def test_update_info_step_is_int32():
    info = update_info(5)
    assert info.step.dtype == jnp.int32 and int(info.step) == 5 and info.grads is None


def test_chain_applies_in_order():
    # (x * 2) + 3 != (x + 3) * 2, so the order is visible in the numbers.
    p = {"w": jnp.array([1.0, -1.0, 0.5])}
    t = chain(_scale_transform(2.0), _add_transform(3.0))
    out = t.apply(p, t.init(p))
    np.testing.assert_array_equal(out["w"], [5.0, 1.0, 4.0])
    t2 = chain(_add_transform(3.0), _scale_transform(2.0))
    out2 = t2.apply(p, t2.init(p))
    np.testing.assert_array_equal(out2["w"], [8.0, 4.0, 7.0])


def test_chain_init_and_update_see_previous_view():
    p = {"w": jnp.array([1.0, 2.0, 3.0])}  # sum 6
    t = chain(_add_transform(1.0), _scale_transform(10.0))
    s = t.init(p)
    assert len(s) == 2
    # The scale transform's init sees p + 1 -> sum 9 (not 6).
    assert float(s[1]) == 9.0
    assert int(s[0]) == 0
    p_new = {"w": jnp.array([0.0, 0.0, 1.0])}  # sum 1
    s2 = t.update(p_new, s, update_info(1))
    assert int(s2[0]) == 1
    # update of the 2nd transform sees p_new + 1 -> sum 4.
    assert float(s2[1]) == 4.0


def test_chain_prune_then_quantize_equals_by_hand_and_keeps_zeros():
    p = _rng_params(1)
    prune, quant = pruning(0.5), weight_quantization(2)
    t = chain(prune, quant)
    s = t.init(p)
    view = t.apply(p, s)

    s_prune = prune.init(p)
    pruned = prune.apply(p, s_prune)
    by_hand = quant.apply(pruned, quant.init(pruned))
    for a, b in zip(jax.tree.leaves(view), jax.tree.leaves(by_hand)):
        np.testing.assert_array_equal(a, b)

    for name in ("Dense_0", "Dense_1"):
        k = np.asarray(p[name]["kernel"])
        mask = np.asarray(s[0].masks[name]["kernel"])
        v = np.asarray(view[name]["kernel"])
        # exactly half pruned, and pruned entries stay exactly zero after 2-bit quantization
        assert (~mask).sum() == round(0.5 * k.size)
        assert np.all(v[~mask] == 0.0)
        # by hand: 2-bit per-channel => each kept value is 0 or +-max|col| of the pruned kernel
        pk = k * mask
        col_max = np.abs(pk).max(axis=0)
        expected = np.where(np.abs(pk / col_max) > 0.5, np.sign(pk) * col_max, 0.0)
        np.testing.assert_allclose(v, expected, rtol=1e-6, atol=0)
        # biases untouched by both transforms
        np.testing.assert_array_equal(view[name]["bias"], p[name]["bias"])


def test_chain_update_matches_manual_sequence():
    p = _rng_params(2)
    t = chain(_add_transform(0.5), _scale_transform(3.0), _add_transform(-1.0))
    s = t.init(p)
    s = t.update(p, s, update_info(1))
    s = t.update(p, s, update_info(2))
    assert int(s[0]) == 2 and int(s[2]) == 2
    total = sum(float(np.sum(np.asarray(x, np.float64) + 0.5)) for x in jax.tree.leaves(p))
    np.testing.assert_allclose(float(s[1]), total, rtol=1e-5)
    out = t.apply(p, s)
    np.testing.assert_allclose(
        out["Dense_0"]["kernel"], (np.asarray(p["Dense_0"]["kernel"]) + 0.5) * 3.0 - 1.0, rtol=1e-6
    )


def test_chain_rejects_non_transform_naming_position():
    with pytest.raises(TypeError, match=r"argument 1 is a str"):
        chain(identity(), "prune")
    with pytest.raises(TypeError, match=r"argument 0 is a function"):
        chain(lambda p: p)
    with pytest.raises(TypeError, match=r"argument 2 is a tuple"):
        chain(identity(), identity(), (1, 2, 3))


@pytest.mark.parametrize("bad_state", [(), ((),), ((), (), ()), [(), ()], None])
def test_chain_wrong_state_raises_value_error(bad_state):
    t = chain(identity(), identity())
    p = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"expected a state tuple of length 2"):
        t.apply(p, bad_state)
    with pytest.raises(ValueError, match=r"expected a state tuple of length 2"):
        t.update(p, bad_state, update_info(1))


def test_chain_empty_is_identity():
    t = chain()
    p = {"w": jnp.array([1.0, 2.0])}
    s = t.init(p)
    assert s == ()
    np.testing.assert_array_equal(t.apply(p, s)["w"], [1.0, 2.0])


def test_chain_is_jittable():
    p = _rng_params(3)
    t = chain(pruning(0.5), weight_quantization(4))
    s = t.init(p)
    eager = t.apply(p, s)
    jitted = jax.jit(t.apply)(p, s)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# rules: explain / select
# ---------------------------------------------------------------------------------------------


def _mixed_tree():
    return {
        "Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
        "Dense_1": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)},
        "head": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
        "step": jnp.zeros((2, 2), jnp.int32),
        "conv": [jnp.ones((3, 3, 1, 2)), jnp.ones((3, 3, 2, 2), jnp.bfloat16)],
    }


def test_explain_first_match_wins_with_indices_and_reasons():
    rules = [("^head/", None), ("Dense_1/kernel", 0.9), ("kernel", True), ("conv/1", 4)]
    d = {x.path: x for x in explain(_mixed_tree(), rules)}
    assert list(d) == [
        "Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel",
        "conv/0", "conv/1", "head/bias", "head/kernel", "step",
    ]
    expect = {
        "Dense_0/bias": (None, None, "ndim 1 < 2"),
        "Dense_0/kernel": (2, True, "rule 2"),
        "Dense_1/bias": (None, None, "ndim 1 < 2"),
        # rule 1 matches before rule 2 (which also matches)
        "Dense_1/kernel": (1, 0.9, "rule 1"),
        "conv/0": (None, None, "no rule matched"),
        "conv/1": (3, 4, "rule 3"),
        "head/bias": (None, None, "ndim 1 < 2"),
        "head/kernel": (0, None, "rule 0"),
        "step": (None, None, "not floating"),
    }
    for path, (rule, value, reason) in expect.items():
        assert (d[path].rule, d[path].value, d[path].reason) == (rule, value, reason), path
    assert d["Dense_1/kernel"].pattern == "Dense_1/kernel"
    assert d["head/kernel"].pattern == "^head/"
    assert d["conv/1"].dtype == "bfloat16" and d["conv/1"].shape == (3, 3, 2, 2)
    assert d["step"].dtype == "int32"


def test_explain_false_value_means_skip_and_min_ndim():
    tree = {"a": jnp.ones((2, 2)), "b": jnp.ones(3), "c": jnp.ones((2, 2, 2))}
    d = {x.path: x for x in explain(tree, [("a", False), (".*", True)], min_ndim=1)}
    assert (d["a"].rule, d["a"].value, d["a"].reason) == (0, None, "rule 0")
    assert (d["b"].rule, d["b"].value, d["b"].reason) == (1, True, "rule 1")
    d3 = {x.path: x for x in explain(tree, None, min_ndim=3)}
    assert d3["a"].reason == "ndim 2 < 3" and d3["b"].reason == "ndim 1 < 3"
    assert (d3["c"].rule, d3["c"].value) == (0, True)


def test_default_rules_pick_every_float_kernel():
    assert DEFAULT_RULES == ((r".*", True),)
    sel = select(_mixed_tree())
    assert sel["Dense_0"]["kernel"] is True and sel["head"]["kernel"] is True
    assert sel["conv"][0] is True and sel["conv"][1] is True
    assert sel["Dense_0"]["bias"] is None and sel["step"] is None


def test_select_returns_none_for_skipped_leaves_and_preserves_structure():
    tree = _mixed_tree()
    sel = select(tree, [("^head/", None), ("Dense_1/kernel", 0.9), ("kernel", True)])
    assert jax.tree.structure(sel, is_leaf=is_none) == jax.tree.structure(tree)
    assert sel == {
        "Dense_0": {"kernel": True, "bias": None},
        "Dense_1": {"kernel": 0.9, "bias": None},
        "head": {"kernel": None, "bias": None},
        "step": None,
        "conv": [None, None],
    }
    # mapping over the selection together with params, with None as a leaf
    counts = jax.tree.map(lambda v, x: 0 if v is None else x.size, sel, tree, is_leaf=is_none)
    assert sum(jax.tree.leaves(counts)) == 12 + 8


def test_rules_on_nested_list_pytree():
    tree = {"blocks": [{"w": jnp.ones((2, 3))}, {"w": jnp.ones((3, 3))}, (jnp.ones((4, 1)), jnp.ones(1))]}
    assert leaf_names(tree) == ["blocks/0/w", "blocks/1/w", "blocks/2/0", "blocks/2/1"]
    sel = select(tree, [(r"^blocks/1/", 2), (r"^blocks/\d+/w$", 8), (r"/0$", 0.25)])
    assert sel["blocks"][0]["w"] == 8
    assert sel["blocks"][1]["w"] == 2
    assert sel["blocks"][2][0] == 0.25
    assert sel["blocks"][2][1] is None  # ndim 1


def test_rules_on_flax_linen_params():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(8)(x))
            x = nn.LayerNorm()(x)
            return nn.Dense(3)(x)

    variables = MLP().init(jax.random.key(0), jnp.ones((1, 5)))
    decisions = explain(variables, [("Dense_1/", None), ("kernel$", True)])
    summary = [(d.path, d.shape, d.rule, d.value, d.reason) for d in decisions]
    assert summary == [
        ("params/Dense_0/bias", (8,), None, None, "ndim 1 < 2"),
        ("params/Dense_0/kernel", (5, 8), 1, True, "rule 1"),
        ("params/Dense_1/bias", (3,), None, None, "ndim 1 < 2"),
        ("params/Dense_1/kernel", (8, 3), 0, None, "rule 0"),
        ("params/LayerNorm_0/bias", (8,), None, None, "ndim 1 < 2"),
        ("params/LayerNorm_0/scale", (8,), None, None, "ndim 1 < 2"),
    ]
    # and a transform driven by these rules touches exactly Dense_0/kernel
    t = pruning(0.5, rules=[("Dense_1/", None), ("kernel$", True)])
    view = t.apply(variables, t.init(variables))
    assert int(np.sum(np.asarray(view["params"]["Dense_0"]["kernel"]) == 0)) == 20
    np.testing.assert_array_equal(view["params"]["Dense_1"]["kernel"], variables["params"]["Dense_1"]["kernel"])


def test_invalid_regex_raises_value_error_naming_pattern():
    with pytest.raises(ValueError, match=r"rules\[1\] has an invalid regex '\(\[unclosed'"):
        explain({"w": jnp.ones((2, 2))}, [("ok", True), ("([unclosed", True)])
    with pytest.raises(ValueError, match=r"invalid regex '\*bad'"):
        select({"w": jnp.ones((2, 2))}, [("*bad", True)])


@pytest.mark.parametrize("rules", ["kernel", b"kernel", {"kernel": True}, 3, (r for r in [("a", 1)])])
def test_non_sequence_rules_raise_type_error(rules):
    with pytest.raises(TypeError, match=r"rules must be a sequence of \(regex, value\) pairs"):
        explain({"w": jnp.ones((2, 2))}, rules)


@pytest.mark.parametrize("rule", [("kernel",), ["kernel", True], (3, True), ("a", 1, 2)])
def test_malformed_rule_raises_type_error_naming_index(rule):
    with pytest.raises(TypeError, match=r"rules\[1\] must be a \(regex: str, value\) pair"):
        explain({"w": jnp.ones((2, 2))}, [("x", None), rule])


def test_format_decisions_markdown():
    out = format_decisions(explain({"b": jnp.ones(2), "k": jnp.ones((2, 3))}))
    assert out.splitlines() == [
        "| path | shape | dtype | value | why |",
        "| --- | --- | --- | --- | --- |",
        "| b | (2,) | float32 | None | ndim 1 < 2 |",
        "| k | (2, 3) | float32 | True | rule 0 |",
    ]


def test_fake_quant_in_chain_is_exact_composition():
    # chain(weight_quantization(4), identity()) == fake_quant on each kernel, per channel.
    p = _rng_params(4)
    t = chain(weight_quantization(4), identity())
    view = t.apply(p, t.init(p))
    np.testing.assert_array_equal(
        view["Dense_1"]["kernel"], fake_quant(p["Dense_1"]["kernel"], 4, channel_axis=-1)
    )
