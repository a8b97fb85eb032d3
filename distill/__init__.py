"""Distillation of a teacher pool into one timm ResNet student: MEAL v1/v2, KD and CE on the shared engine.

Modules (nothing is imported here, so ``imat --help`` stays instant):

- ``distill.blocks``: stage outputs + logits from one ``forward_intermediates`` pass; index checks.
- ``distill.align``: the parameter-free aligner (B,C,H,W) -> (B,L_k).
- ``distill.losses``: soft-CE (default), KL, L1, L2, L1/L2 on softmax; temperature; Hinton KD.
- ``distill.discriminator`` / ``distill.grl``: per-block MLP discriminators, gradient reversal.
- ``distill.teachers_runtime``: frozen teachers with their own mean/std/size; random | mean selection.
- ``distill.tasks``: what every task shares (the hard-label loss, teachers' placement, mixing).
- ``distill.methods``: one file per method, registered by name: ``ce``, ``kd``, ``meal`` (``MealTask``,
  modes alternating | grl | joint), ``meal_v2``.
- ``distill.cache``: offline top-k teacher logits (exact soft labels at any stored T) per image and crop view.
- ``distill.cache_build``: builds that cache with the teachers and trains on its views.
- ``distill.train``: ``distill(cfg)``, the checks and the engine run behind ``imat distill``.
- ``distill.audit``: ``audit(pool_dir, cfg)`` behind ``imat data audit``.

Decisions where the papers and the official code disagree (docs/MEAL.md):
the default adversarial mode is ``alternating`` (the paper's game: D learns teacher=1/student=0, the
student is rewarded for being called teacher); ``joint`` reproduces the official code, where the student
also minimises D's loss. Discriminators end in one logit without a final ReLU. Teachers run in eval mode
under no_grad (``teacher_train_mode`` restores MEAL v1's batch-statistics BN without changing the
teachers' buffers). The student must be a timm ResNet unless ``distill.allow_any_student`` is set.
"""
