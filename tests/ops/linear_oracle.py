"""The float64 NumPy oracle, random inputs and loss of the linear-RNN op tests.

One recurrence covers the family (simple_gla, gla, delta_rule, gated_delta_rule, kda). Per token t,
with the state S [B,H,Dk,Dv]:

  D_t = diag(exp(g_t))       g_t a log-decay per head, or per key channel, or none (D_t = I)
  S_t = D_t S_{t-1} + k_t^T v_t                                      without beta
  S_t = (I - b_t k_t^T k_t) D_t S_{t-1} + b_t k_t^T v_t              with beta (the delta rule)
  o_t = scale * q_t S_t

With segment_ids (packed documents) S_{t-1} is replaced by zeros where the id changes between t-1
and t.
"""

import jax
import jax.numpy as jnp
import numpy as np

from tests.utils import assert_rel_close, randn


def oracle(q, k, v, g, beta, scale, initial_state=None, segment_ids=None):
  """Token-by-token float64 recurrence (module docstring); g and beta may be None.

  q [B,T,H,Dk], k [B,T,Hk,Dk], v [B,T,Hk,Dv]; g [B,T,G] (per head) or [B,T,G,Dk] (per channel) and
  beta [B,T,G], with Hk and G dividing H; initial_state [B,H,Dk,Dv] or None (zeros);
  segment_ids [B,T] or None (one document per row).
  Returns (o [B,T,H,Dv], final state [B,H,Dk,Dv]).
  """
  q = np.asarray(q, np.float64)
  b, t, h, dk = q.shape
  per_head = lambda x: np.repeat(np.asarray(x, np.float64), h // x.shape[2], axis=2)
  k, v = per_head(k), per_head(v)
  decay = np.ones((b, t, h, 1, 1)) if g is None else np.exp(per_head(g).reshape(b, t, h, -1, 1))
  rates = None if beta is None else per_head(beta)[..., None, None]                # [B,T,H,1,1]
  state = np.zeros((b, h, dk, v.shape[-1])) if initial_state is None \
      else np.asarray(initial_state, np.float64).copy()
  eye = np.eye(dk)
  o = np.zeros((b, t, h, v.shape[-1]))
  for i in range(t):
    if segment_ids is not None and i > 0:
      state[segment_ids[:, i] != segment_ids[:, i - 1]] = 0
    state = decay[:, i] * state
    write = k[:, i, :, :, None] * v[:, i, :, None, :]                       # [B,H,Dk,Dv]
    if rates is None:
      state = state + write
    else:
      kk = k[:, i, :, :, None] * k[:, i, :, None, :]                        # [B,H,Dk,Dk]
      state = (eye - rates[:, i] * kk) @ state + rates[:, i] * write
    o[:, i] = scale * np.einsum("bhd,bhde->bhe", q[:, i], state)
  return o, state


def make_inputs(rng, b=2, t=37, h=4, hk=2, dk=8, dv=6, gate_heads=None, decay=(-1.0, -0.01), *,
                per_channel=False, delta=False):
  """Random float32 q, k, v, g, [beta,] initial_state (beta only with `delta`).

  q [B,T,H,Dk], k [B,T,Hk,Dk], v [B,T,Hk,Dv], initial_state [B,H,Dk,Dv]; g uniform in `decay`,
  [B,T,G] or with `per_channel` [B,T,G,Dk], G = gate_heads (default hk). With `delta` the keys are
  L2-normalised and beta = sigmoid(normal) [B,T,G].
  """
  gates = gate_heads or hk
  q = randn(rng, b, t, h, dk)
  k = randn(rng, b, t, hk, dk)
  if delta:
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  v = randn(rng, b, t, hk, dv)
  g = rng.uniform(*decay, size=(b, t, gates, dk) if per_channel else (b, t, gates))
  betas = ((1 / (1 + np.exp(-rng.standard_normal((b, t, gates))))).astype(np.float32),) \
      if delta else ()
  s0 = randn(rng, b, h, dk, dv)
  return (q, k, v, g.astype(np.float32)) + betas + (s0,)


def loss_fn(op, impl, ct, proj, chunk_size=16):
  """sum(o * ct) + sum(final_state * proj) as a function of every input of `op`.

  `op(*inputs, initial_state=..., output_final_state=True, chunk_size=..., impl=...)`; the loss
  takes the op's inputs, then the initial state.
  """
  def loss(*inputs):
    o, s = op(*inputs[:-1], initial_state=inputs[-1], output_final_state=True,
              chunk_size=chunk_size, impl=impl)
    return jnp.sum(o * ct) + jnp.sum(s * proj)
  return loss


def assert_gradients_match(op, inputs, names, ct, proj, argnums=None, chunk_size=16):
  """Checks the gradients of loss_fn(op, ., ct, proj) w.r.t. inputs[i] for i in `argnums`.

  `inputs` are the op's float32 inputs then the initial state (`names` name them all); argnums
  defaults to all; `chunk_size` is the xla path's. The xla path must match the reference path in
  float32, and both the reference path's gradients in float64 (`jax.enable_x64`), within 1e-5
  relative.
  """
  argnums = tuple(range(len(inputs))) if argnums is None else argnums
  grads_xla = jax.grad(loss_fn(op, "xla", ct, proj, chunk_size), argnums)(*inputs)
  grads_ref = jax.grad(loss_fn(op, "reference", ct, proj), argnums)(*inputs)
  with jax.enable_x64(True):
    grads_64 = jax.grad(loss_fn(op, "reference", ct.astype(np.float64), proj.astype(np.float64)),
                        argnums)(*(x.astype(np.float64) for x in inputs))
    grads_64 = [np.asarray(grad) for grad in grads_64]
  assert grads_64[0].dtype == np.float64
  for i, g_xla, g_ref, g_64 in zip(argnums, grads_xla, grads_ref, grads_64):
    assert g_xla.shape == g_64.shape == inputs[i].shape
    assert_rel_close(g_xla, g_ref, 1e-5, f"d{names[i]} xla vs reference")
    assert_rel_close(g_xla, g_64, 1e-5, f"d{names[i]} xla vs float64")
    assert_rel_close(g_ref, g_64, 1e-5, f"d{names[i]} reference vs float64")
