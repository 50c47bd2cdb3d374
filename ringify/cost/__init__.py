"""Cost model of a ringified model, per device: memory, the ring step, and the largest context that fits.

A :class:`ModelProfile` says what a model costs independently of the sequence length S and the world size W;
:func:`profile_model` measures it by running the captured graph on fake tensors (:mod:`ringify.cost.profile`).
The analytic model (:mod:`ringify.cost.model`) turns a profile and a :class:`Hardware` profile into memory per
device at S tokens on W devices (:func:`estimate`), the largest context that fits (:func:`max_context`), one
ring step and whether its transfer hides behind the block's compute (:func:`min_block_tokens`: the overlap
condition of Ring Attention), the memory and time of ``rm.generate`` (:func:`generation_estimate`,
:func:`max_prompt`), and curves of all of it for reports (:func:`cost_summary`). The formulas, what is
measured and the approximations are in ``docs/cost_model.md``.
"""

from .model import (HARDWARE, OPTIMIZER_STATES, Hardware, ModelProfile, cache_slots, check_training_setup,
                    cost_summary, estimate, generation_estimate, generation_summary, max_context, max_prompt,
                    min_block_tokens)
from .profile import profile_model

__all__ = ["HARDWARE", "OPTIMIZER_STATES", "Hardware", "ModelProfile", "cache_slots", "check_training_setup",
           "cost_summary", "estimate", "generation_estimate", "generation_summary", "max_context", "max_prompt",
           "min_block_tokens", "profile_model"]
