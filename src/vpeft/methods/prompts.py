"""Initialisation shared by the prompt methods (VPT, VFPT, E2VPT, NOAH's prompts)."""

from __future__ import annotations

import math

from vpeft.backbones.anatomy import Anatomy


def prompt_init_bound(anatomy: Anatomy) -> float:
    """v of VPT's prompt init uniform(-v, v): sqrt(6 / (3 * patch_area + dim)), the paper's Xavier variant
    (a 16x16 patch where the backbone has none)."""
    patch_area = math.prod(anatomy.patch_size or (16, 16))
    return math.sqrt(6.0 / float(3 * patch_area + anatomy.embed_dim))
