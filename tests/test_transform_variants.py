"""The same transforms, run eagerly, under jit and under pmap, give the same views and states.

``chex.variants`` runs each test body once per variant; ``chex.assert_trees_all_close`` reports
the differing leaf paths when a tree differs.
"""
import chex
import jax.numpy as jnp
import numpy as np

import jaxcompress as jc
from jaxcompress.core.transform import update_info
from jaxcompress.prune import NM, polynomial_schedule


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"fc1": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32), "bias": jnp.zeros(8)},
            "head": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "bias": jnp.zeros(4)}}


TRANSFORMS = {
    "prune+int4": lambda: jc.chain(jc.pruning(0.5), jc.weight_quantization(4)),
    "gradual+affine8": lambda: jc.chain(
        jc.pruning(0.75, schedule=polynomial_schedule(begin_step=0, end_step=3, frequency=1)),
        jc.weight_quantization(8, symmetric=False)),
    "2:4+ternary": lambda: jc.chain(jc.pruning(0.5, structure=NM(2, 4, axis=0)), jc.weight_quantization("ternary")),
}


class TransformVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_apply_and_update_agree_across_variants(self):
        for name, make in TRANSFORMS.items():
            t = make()
            params = _params()
            state = t.init(params)
            want_view = t.apply(params, state)
            want_state = t.update(params, state, update_info(1, grads=params))

            def run(p, s):
                return t.apply(p, s), t.update(p, s, update_info(1, grads=p))

            # with_pmap broadcasts the arguments to every device and returns the first's result
            view, new_state = self.variant(run)(params, state)
            chex.assert_trees_all_close(view, want_view, rtol=0, atol=0, custom_message=name)
            chex.assert_trees_all_equal(new_state, want_state, custom_message=name)
            # pruned zeros stay zero in the quantized view
            for spec_path, spec in t.describe(params, state).items():
                leaf = view[spec_path.split("/")[0]]["kernel"]
                np.testing.assert_array_equal(np.asarray(leaf)[~np.asarray(spec.mask)], 0.0, err_msg=name)
