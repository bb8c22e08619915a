"""Checkpoints: orbax CheckpointManager over the train state and the grain data iterator.

A checkpoint of step s holds "state" (params, optimiser state and step; every array saved with its
sharding) and "data" (each host's grain iterator state), so a restart continues with the exact next
batch. orbax writes into a temporary folder and renames it when complete, so a crash mid-save
leaves the previous checkpoint as the latest good one; saves are asynchronous (training goes on
while the arrays are written) and the oldest checkpoints beyond `keep` are deleted.
"""

from __future__ import annotations

import os
import signal
import threading

import grain
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores (train state, data iterator) pairs under `directory`."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    if keep <= 0:
      raise ValueError(f"keep (checkpoints to keep) must be positive, got {keep}")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
    """Starts saving `state` and `data_iterator`'s position as checkpoint `step`.

    Returns whether a save was started (False when `step` is already saved).
    """
    if step in self._manager.all_steps():
      return False
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=grain.checkpoint.CheckpointSave(data_iterator)),
        force=force)

  def restore(self, step: int, abstract_state, data_iterator):
    """Returns the train state of checkpoint `step`, laid out like `abstract_state`.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings; `data_iterator` is moved
    in place to the saved position.
    """
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored["state"]

  def reached_preemption(self, step: int) -> bool:
    """Whether the cluster (multi-host preemption notice) asks to stop at `step`."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are complete."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


class StopSignal:
  """Records SIGTERM (preemption, `kill`) so the training loop can save and exit cleanly.

  Use as a context manager; the previous handler is restored on exit. Only installs the handler
  from the main thread (signal handlers cannot be set elsewhere).
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def __enter__(self) -> StopSignal:
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handle(self, signum, frame) -> None:
    self._event.set()

  @property
  def received(self) -> bool:
    return self._event.is_set()
