"""Rotation in the search: the rotate passes run on the loaded model first, so sensitivities are the rotated model's."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from bitsmith.compiler.ir import Module
from bitsmith.errors import BitsmithError
from bitsmith.passes.base import PassContext
from bitsmith.passes.choose_rotations import ChooseRotations
from bitsmith.passes.find_outlier_channels import FindOutlierChannels
from bitsmith.passes.fold_norm_scales import FoldNormScales
from bitsmith.passes.manager import Pass, run_passes
from bitsmith.passes.rotate_ffn_online import RotateFFNOnline
from bitsmith.passes.rotate_heads import RotateHeads
from bitsmith.passes.rotate_keys_online import RotateKeysOnline
from bitsmith.passes.rotate_residual import RotateResidual

ROTATE_CHOICES = ("none", "hadamard", "auto")  # auto: search both, keep the plan with the lower measured KLD
SEARCHED_ROTATIONS = {"none": ("none",), "hadamard": ("hadamard",), "auto": ("none", "hadamard")}


def rotation_kinds(rotate: str) -> tuple[str, ...]:
    """The rotations a search runs for `--rotate`: one, or both for auto."""
    if rotate not in SEARCHED_ROTATIONS:
        raise BitsmithError(f"--rotate {rotate!r} is not one of {', '.join(ROTATE_CHOICES)}", where="search",
                            fix="use --rotate none, hadamard or auto")
    return SEARCHED_ROTATIONS[rotate]


def rotation_passes(seed: int) -> list[Pass]:
    """The pipeline's rotate phase for `compile --rotate hadamard --rotate-seed SEED` with every rotation on
    (outlier channels left unrotated, R1, R2, the online R4 before down_proj and R3 on q/k); tests/search checks
    it equals pipeline.default_passes'."""
    return [FindOutlierChannels(), FoldNormScales(), ChooseRotations(seed), RotateResidual(), RotateHeads(),
            RotateFFNOnline(seed), RotateKeysOnline(seed)]


def rotate_model(module: Module, weights: Mapping[str, np.ndarray], kind: str, seed: int,
                 calibration: np.ndarray | None) -> tuple[Module, dict[str, np.ndarray]]:
    """(module, float32 weights) after the rotate passes (`kind` hadamard), or unchanged (none). The rotated
    fp32 model computes the original's logits (to ~1e-6), so its KLD is measured against itself. `calibration`:
    the compile's calibration tokens (find_outlier_channels reads the first few), so the outlier channels, and
    with them the rotation, are the ones `compile --plan` will find."""
    if kind == "none":
        return module, dict(weights)
    if kind != "hadamard":
        raise BitsmithError(f"the search rotates with hadamard only, not {kind!r}", where="search",
                            fix="use --rotate none, hadamard or auto")
    ctx = PassContext(dict(weights), calibration=calibration)
    module = run_passes(module, ctx, rotation_passes(seed), verify=False)
    rotated = {name: ctx.weights[name] for name in ctx.weights}  # the passes compute in float64 where they rotate
    return module, {name: w.astype(np.float32) if w.dtype.kind == "f" else w for name, w in rotated.items()}
