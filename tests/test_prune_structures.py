"""Masks against torch.nn.utils.prune, N:M and block structures, and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcompress.prune import (
    NM,
    Blocks,
    Channels,
    Unstructured,
    global_masks,
    pruning,
    structured_mask,
)

torch = pytest.importorskip("torch")
from torch.nn.utils import prune as tprune  # noqa: E402

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True, database=None)


def _linear(w):
    """A torch Linear whose weight is exactly ``w`` (any 2-D shape)."""
    m = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(np.asarray(w, np.float32)))
    return m


def _conv(w):
    m = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(np.asarray(w, np.float32)))
    return m


@pytest.mark.parametrize("amount", [0.0, 0.1, 0.35, 0.5, 0.9, 0.97])
@pytest.mark.parametrize("shape", [(7, 13), (16, 3), (5, 40)])
def test_l1_unstructured_equals_torch(amount, shape):
    w = np.random.default_rng(hash((amount, shape)) % 2**32).normal(size=shape).astype(np.float32)
    m = _linear(w)
    tprune.l1_unstructured(m, "weight", amount=amount)
    ours = structured_mask(jnp.abs(jnp.asarray(w)), amount, Unstructured())
    np.testing.assert_array_equal(np.asarray(ours), m.weight_mask.numpy().astype(bool))
    # The same through the transform (layer scope, one-shot at init).
    t = pruning(amount)
    p = {"k": jnp.asarray(w)}
    np.testing.assert_array_equal(np.asarray(t.init(p).masks["k"]), m.weight_mask.numpy().astype(bool))


@pytest.mark.parametrize("amount", [0.2, 0.5, 0.83])
def test_global_unstructured_equals_torch(amount):
    rng = np.random.default_rng(1)
    ws = [rng.normal(size=s).astype(np.float32) * scale for s, scale in (((6, 10), 1.0), ((8, 6), 3.0), ((4, 8), 0.2))]
    mods = [_linear(w) for w in ws]
    tprune.global_unstructured([(m, "weight") for m in mods], pruning_method=tprune.L1Unstructured, amount=amount)
    want = [m.weight_mask.numpy().astype(bool) for m in mods]
    got = global_masks({"a": jnp.abs(ws[0]), "b": jnp.abs(ws[1]), "c": jnp.abs(ws[2])}, amount)
    for g, w in zip((got["a"], got["b"], got["c"]), want):
        np.testing.assert_array_equal(np.asarray(g), w)
    t = pruning(amount, scope="global")
    state = t.init({"a": jnp.asarray(ws[0]), "b": jnp.asarray(ws[1]), "c": jnp.asarray(ws[2])})
    for k, w in zip("abc", want):
        np.testing.assert_array_equal(np.asarray(state.masks[k]), w)
    # exactly round(amount * total) removed overall, but unevenly across layers
    removed = sum(int((~np.asarray(state.masks[k])).sum()) for k in "abc")
    assert removed == round(amount * sum(w.size for w in ws))


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("amount", [0.25, 0.5, 0.7])
def test_ln_structured_equals_torch_linear(n, dim, amount):
    w = np.random.default_rng(7).normal(size=(12, 9)).astype(np.float32)
    m = _linear(w)
    tprune.ln_structured(m, "weight", amount=amount, n=n, dim=dim)
    ours = structured_mask(jnp.abs(jnp.asarray(w)), amount, Channels(axis=dim, ord=n))
    np.testing.assert_array_equal(np.asarray(ours), m.weight_mask.numpy().astype(bool))


@pytest.mark.parametrize("dim", [0, 1])
def test_ln_structured_equals_torch_conv(dim):
    w = np.random.default_rng(3).normal(size=(8, 6, 3, 3)).astype(np.float32)
    m = _conv(w)
    tprune.ln_structured(m, "weight", amount=0.5, n=2, dim=dim)
    ours = structured_mask(jnp.abs(jnp.asarray(w)), 0.5, Channels(axis=dim, ord=2))
    np.testing.assert_array_equal(np.asarray(ours), m.weight_mask.numpy().astype(bool))


def test_random_unstructured_matches_torch_in_distribution():
    """Same exact count as torch; each position kept with probability 1 - amount, rows hypergeometric."""
    shape, amount = (500, 20), 0.4
    torch.manual_seed(0)
    m = _linear(np.ones(shape, np.float32))
    tprune.random_unstructured(m, "weight", amount=amount)
    theirs = m.weight_mask.numpy().astype(bool)
    ours = np.asarray(pruning(amount, criterion="random", seed=0).init({"k": jnp.ones(shape)}).masks["k"])
    assert ours.sum() == theirs.sum() == 6000
    for mask in (ours, theirs):
        # column frequencies: 500 draws with p = 0.6 (std 0.022); 5 sigma
        assert np.all(np.abs(mask.mean(axis=0) - 0.6) < 0.11)
        # kept per row of 20: hypergeometric, mean 12, variance 20 * .6 * .4 * (9980 / 9999) = 4.79
        assert abs(mask.sum(axis=1).mean() - 12) < 1e-9
        assert abs(mask.sum(axis=1).var() - 4.79) < 1.2
    assert np.mean(ours == theirs) < 0.6  # independent draws, not a copy


def test_random_structured_matches_torch_in_count():
    torch.manual_seed(0)
    m = _linear(np.ones((10, 4), np.float32))
    tprune.random_structured(m, "weight", amount=0.3, dim=0)
    t = pruning(0.3, criterion="random", structure=Channels(axis=0))
    ours = np.asarray(t.init({"k": jnp.ones((10, 4))}).masks["k"])
    assert int(m.weight_mask[:, 0].sum()) == int(ours[:, 0].sum()) == 7
    assert np.all(ours == ours[:, :1])  # whole rows


@SETTINGS
@given(
    n=st.integers(1, 4), extra=st.integers(0, 4), groups=st.integers(1, 4), other=st.integers(1, 5),
    axis=st.sampled_from([0, 1, -1, -2]), seed=st.integers(0, 2**31 - 1),
)
def test_nm_exactly_n_per_group_and_top_n(n, extra, groups, other, axis, seed):
    m = n + extra if n + extra > 0 else 1
    n = min(n, m)
    shape = [other, other]
    shape[axis % 2] = groups * m
    w = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    mask = np.asarray(jax.jit(structured_mask, static_argnums=(1, 2))(jnp.abs(jnp.asarray(w)), 0.0, NM(n, m, axis=axis)))
    moved_w = np.moveaxis(np.abs(w), axis, -1).reshape(-1, m)
    moved_m = np.moveaxis(mask, axis, -1).reshape(-1, m)
    assert np.all(moved_m.sum(-1) == n)
    for row_w, row_m in zip(moved_w, moved_m):  # kept = the n largest (continuous values: no ties)
        assert set(np.flatnonzero(row_m)) == set(np.argsort(-row_w)[:n])


def test_nm_conv_kernel_groups_input_channels():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 8, 5)), jnp.float32)
    t = pruning(0.0, structure=NM(2, 4))  # default axis -2: input channels of an HWIO kernel
    mask = np.asarray(t.init({"k": w}).masks["k"])
    assert np.all(mask.reshape(3, 3, 2, 4, 5).sum(axis=3) == 2)
    assert mask.mean() == 0.5


def test_blocks_against_numpy():
    w = np.random.default_rng(2).normal(size=(8, 12)).astype(np.float32)
    mask = np.asarray(structured_mask(jnp.abs(jnp.asarray(w)), 0.5, Blocks((2, 3))))
    sums = np.abs(w).reshape(4, 2, 4, 3).sum(axis=(1, 3))
    keep = sums > np.sort(sums.ravel())[7]  # 16 blocks, remove 8 smallest
    np.testing.assert_array_equal(mask, np.repeat(np.repeat(keep, 2, 0), 3, 1))


def test_structured_pruning_in_transform_keeps_pruned_channels_pruned():
    from jaxcompress.core import update_info
    from jaxcompress.prune import polynomial_schedule

    w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 10)), jnp.float32)
    t = pruning(0.6, structure=Channels(axis=-1), schedule=polynomial_schedule(end_step=2, frequency=1))
    s = t.init({"k": w})
    for step in (1, 2):
        before = np.asarray(s.masks["k"])
        s = t.update({"k": w * 5.0}, s, update_info(step))
        after = np.asarray(s.masks["k"])
        assert not np.any(after & ~before)
    assert int(np.asarray(s.masks["k"])[0].sum()) == 4  # 6 of 10 channels removed


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_errors_name_the_problem():
    w = jnp.ones((4, 8))
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        pruning(1.0)
    with pytest.raises(ValueError, match="sparsity must be in"):
        structured_mask(w, 1.2)
    with pytest.raises(ValueError, match="n <= m"):
        structured_mask(w, 0.0, NM(5, 4, axis=1))
    with pytest.raises(ValueError, match="does not exist"):
        structured_mask(w, 0.5, Channels(axis=2))
    with pytest.raises(ValueError, match="does not exist"):
        pruning(0.5, structure=Channels(axis=3)).init({"k": w})
    with pytest.raises(ValueError, match="not divisible"):
        structured_mask(w, 0.0, NM(2, 3, axis=1))
    with pytest.raises(ValueError, match="does not divide"):
        structured_mask(w, 0.5, Blocks((3, 3)))
    with pytest.raises(ValueError, match="criterion must be one of"):
        pruning(0.5, criterion="l1")
    with pytest.raises(ValueError, match="scope='global' supports only"):
        pruning(0.5, scope="global", structure=Channels())
    with pytest.raises(TypeError, match="structure must be"):
        structured_mask(w, 0.5, "2:4")


@pytest.mark.filterwarnings("ignore:these pruning rules match no float leaf")
def test_unused_rules_warn_and_int_leaves_raise():
    p = {"dense": {"kernel": jnp.ones((4, 4))}, "table": {"ids": jnp.ones((4, 4), jnp.int32)}}
    with pytest.warns(UserWarning, match=r"match no float leaf.*'\^conv/'"):
        pruning(0.5, rules=[("^conv/", True), ("^dense/", True)]).init(p)
    with pytest.raises(TypeError, match="not floating"):
        pruning(0.5, rules=[("^table/", True)]).init(p)
    # first match wins: an earlier rule leaving the int leaf alone is fine
    masks = pruning(0.5, rules=[("^table/", None), ("ids", True), (".*", True)]).init(p).masks
    assert masks["table"]["ids"] is None and int(masks["dense"]["kernel"].sum()) == 8
