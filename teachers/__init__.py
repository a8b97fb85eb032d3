"""The teacher pool: timm teachers built from config, trained by the shared engine, indexed by pool.json,
evaluated alone and as ensembles, and selected greedily for distillation.

Public API (used by ``distill`` and ``submit``)::

    from teachers.build import create_model, resolve_data_config, load_pretrained
    from teachers.pool import TeacherEntry, load_pool, load_teacher, update_pool_entry, read_pool_json
    from teachers.ensemble import pool_probs, predict_probs, ensemble_probs, topk_accuracy
    from teachers.select import greedy_select
"""
