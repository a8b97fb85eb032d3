"""MEAL V2 (Shen & Savvides 2020): the mean of all teachers' probabilities on the final outputs, with a
discriminator on the logits. The MEAL task on the logits block alone; its targets can come from the
offline teacher cache."""

from __future__ import annotations

from collections.abc import Sequence

from distill.methods.base import register_method
from distill.methods.meal import Meal
from distill.teachers_runtime import FrozenTeacher
from imat.config.distill import DistillConfig
from imat.errors import ImatError


@register_method
class MealV2(Meal):
    name = "meal-v2"
    uses_cache = True

    @classmethod
    def default_selection(cls, dcfg: DistillConfig, teachers: Sequence[FrozenTeacher]) -> str:
        return "mean"

    @classmethod
    def check(cls, dcfg: DistillConfig) -> None:
        super().check(dcfg)
        stage = [i for i, b in enumerate(dcfg.blocks) if b.index != "logits"]
        if stage:
            raise ImatError(
                f"distill.blocks.{stage[0]}: meal-v2 works on the final outputs only; use method=meal "
                f"for intermediate blocks"
            )
        if dcfg.selection in ("random", "weighted"):
            raise ImatError(
                f"distill.selection: meal-v2 averages all teachers (mean); use method=meal for {dcfg.selection}"
            )

    @classmethod
    def check_cache(cls, dcfg: DistillConfig) -> None:
        if dcfg.similarity in ("l1", "l2"):
            # l1/l2 compare raw logits; the cache keeps only the top-k ones, so they would silently compare
            # something else: refused rather than changed in meaning
            raise ImatError(
                f"distill.similarity: {dcfg.similarity} compares full teacher logits, which the teacher "
                f"cache does not keep; use ce, kl, l1_soft or l2_soft, or set distill.cache.enabled=false"
            )
