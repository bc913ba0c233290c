"""Train LoRA runs inside ComfyUI's training mode (``model_management.in_training``, which hosts from 0.33 have
and which routes kernels without a backward pass to plain torch) and gives the previous value back however
the run ends: finished, failed or cancelled. A host without the flag (0.3.75) is left without it."""

from __future__ import annotations

import pytest
import torch

from tests.comfy.conftest import run_node
from tests.comfy.test_train_nodes import TRAIN, _encoded

UNSET = object()


@pytest.fixture
def seen(sd15):
    """The value of ComfyUI's training flag at every forward pass of the diffusion model, the probe's included;
    ``seen.steps`` counts the training forwards (with gradients), ``seen.fail_at`` makes that training forward
    raise, ``seen.cancel_at`` presses Cancel there."""
    from comfy import model_management as mm

    class Seen(list):
        fail_at = cancel_at = None
        steps = 0

    values = Seen()

    def record(module, args):
        values.append(getattr(mm, "in_training", UNSET))
        values.steps += torch.is_grad_enabled()
        if not torch.is_grad_enabled():
            return
        if values.steps == values.fail_at:
            raise RuntimeError("a layer failed")
        if values.steps == values.cancel_at:
            mm.interrupt_current_processing(True)
            mm.throw_exception_if_processing_interrupted()

    handle = sd15[0].model.diffusion_model.register_forward_pre_hook(record)
    yield values
    handle.remove()
    mm.interrupt_current_processing(False)


def _flag():
    from comfy import model_management as mm

    return getattr(mm, "in_training", UNSET)


def test_training_runs_in_comfyuis_training_mode_where_the_host_has_one(comfy, sd15, demo_folder, seen):
    before = _flag()
    encoded, _ = _encoded(comfy, sd15, demo_folder)
    run_node(comfy, "LoraTrainerTrain", model=sd15[0], encoded=encoded, **TRAIN)
    assert seen.steps == TRAIN["steps"] and len(seen) > seen.steps  # and the probe's forwards, before and after
    assert set(seen) == ({UNSET} if before is UNSET else {True})
    assert before in (UNSET, False) and _flag() is before


@pytest.mark.parametrize("ending", ["fail_at", "cancel_at"])
def test_the_training_flag_is_restored_when_a_run_fails_or_is_cancelled(comfy, sd15, demo_folder, seen, ending):
    from comfy import model_management as mm

    before = _flag()
    encoded, _ = _encoded(comfy, sd15, demo_folder)
    setattr(seen, ending, 3)
    expected = RuntimeError if ending == "fail_at" else mm.InterruptProcessingException
    with pytest.raises(expected):
        run_node(comfy, "LoraTrainerTrain", model=sd15[0], encoded=encoded, **{**TRAIN, "name": f"tests/{ending}"})
    assert seen.steps == 3 and set(seen) == ({UNSET} if before is UNSET else {True})
    assert _flag() is before
