"""The grouped data-parallel MoCo step (`ssl._group_gradients`) on 4 CPU devices of one process:
the same step as one device, and its gradients cross the devices as ONE flat all-reduce (XLA's
tuple all-reduce of every gradient array runs array by array between processes; README,
"Several hosts")."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from jaxattr import data, ssl
    from tests.test_ssl import _tiny_config

    assert len(jax.devices()) == 4
    c = _tiny_config()  # with 8 groups, 2 per device
    c.pretrain.batch_size = 32
    c.encoder.num_splits = 8
    c.pretrain.memory_bank_size = 64
    train, _ = data.load_splits(c.data)
    model = ssl.moco_model(c)
    state = ssl.init_state(c, jax.random.key(0), train.images.shape[1:], len(train))
    images, key = jnp.asarray(train.images), jax.random.key(1)

    one = ssl.make_train_fn(c, model, len(train))
    s1, m1 = one(jax.tree.map(jnp.copy, state), images, key)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    assert ssl.is_grouped(c, mesh)
    shardings = ssl.state_shardings(state, c, mesh)
    placed = jax.tree.map(lambda x, sh: jax.device_put(x, sh), state, shardings)
    four = ssl.make_train_fn(c, model, len(train), mesh=mesh, state_sharding=shardings)
    hlo = four.lower(placed, images, key).compile().as_text()
    s4, m4 = four(placed, images, key)

    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s1.batch_stats), jax.tree.leaves(s4.batch_stats)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    # The gradients: one all-reduce of one flat array holding every parameter.
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    reduces = [l.split("all-reduce(")[0] for l in hlo.splitlines() if "all-reduce(" in l]
    flat = [r for r in reduces if "f32[%d]{0}" % num_params in r]
    assert len(flat) == 1, reduces  # (XLA may combine the loss's psum with it)
    widest = max(r.count("[") for r in reduces)
    assert widest <= 3, reduces  # no tuple all-reduce of the gradient arrays
    print("OK", num_params)
""")


def test_grouped_data_parallel_step_equals_one_device_with_one_flat_gradient_all_reduce():
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)
  assert res.returncode == 0 and "OK" in res.stdout, (res.stdout + res.stderr)[-4000:]
