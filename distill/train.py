"""`imat distill`: build the student, the frozen teachers and the task, check everything, run the engine.

Every check that can fail runs before the first step, each as a one-line ImatError: an unknown method,
unknown or non-ResNet student, teacher/student/manifest class counts, a block index missing from a
network, a stage block without a pooled length, a logits block whose length is not the class count, and
what the method itself validates (``distill.methods``). The method builds the task; training itself is the
shared engine's (no second loop here); the run goes to ``RUN_DIR/student/``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from distill.methods import MethodInputs, get_method, method_names
from distill.settings import default_selection, pool_dir_of, selection_probabilities
from distill.tasks import DistillTaskBase
from distill.teachers_runtime import FrozenTeacher, TeacherEnsemble
from imat.config import RunConfig, save_resolved
from imat.config.distill import DistillConfig
from imat.errors import ImatError
from imat.io import write_csv
from imat.manifest import ClassMap, load_manifest, prepare_manifest

log = logging.getLogger(__name__)

STUDENT_DIR = "student"


# -- the student -------------------------------------------------------------------------------------


def is_resnet(model: nn.Module) -> bool:
    """timm's ResNet class covers resnet10t..152, ResNet-D/-T, ResNeXt, SE-ResNet(X)t, wide ResNets."""
    from timm.models.resnet import ResNet

    return isinstance(model, ResNet)


def build_student(dcfg: DistillConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """The student network (from scratch, or from ``student.pretrained``) and its input pipeline."""
    from teachers.build import create_model, load_pretrained, resolve_data_config

    spec = dcfg.student
    data_cfg = resolve_data_config(spec)  # unknown arch -> one-line error
    model = create_model(spec, num_classes, load_weights=False)
    if not is_resnet(model) and not dcfg.allow_any_student:
        raise ImatError(
            f"distill.student.arch: {spec.arch} is not a timm ResNet (resnet18/26/34/50/101, resnext, "
            f"seresnet, ...); set distill.allow_any_student=true to distil into it anyway"
        )
    if spec.pretrained == "hub":
        model = create_model(spec, num_classes, load_weights=True)
    elif spec.pretrained:
        load_pretrained(model, spec.pretrained)
    return model, data_cfg


# -- teachers ----------------------------------------------------------------------------------------


def teacher_names(cfg: RunConfig, pool_dir: Path) -> list[str] | None:
    """``distill.teachers`` as names: a list as given, "selected" from pool.json's greedy selection."""
    names = cfg.distill.teachers
    if names != "selected":
        return names
    from teachers.pool import pool_file, read_pool_json

    selected = read_pool_json(pool_dir).get("selected", {}).get("teachers")
    if not selected:
        raise ImatError(
            f"distill.teachers: 'selected' needs the pool's greedy selection in {pool_file(pool_dir)} "
            f"(run `imat teachers eval {pool_dir}` first)"
        )
    return [str(n) for n in selected]


def load_frozen_teachers(
    cfg: RunConfig, pool_dir: Path, classes: ClassMap, device: str = "cpu"
) -> list[FrozenTeacher]:
    """The pool's teachers (or ``distill.teachers``), frozen, checked against the class map."""
    from imat.weights import read_meta
    from teachers.pool import load_pool, load_teacher

    entries = load_pool(pool_dir, teacher_names(cfg, pool_dir))
    out = []
    for e in entries:
        if e.num_classes != classes.num_classes:
            raise ImatError(
                f"teacher {e.name} has {e.num_classes} classes but the manifest has {classes.num_classes}: "
                f"the pool was trained on other data"
            )
        if e.weights_path.suffix == ".safetensors":
            meta_classes = read_meta(e.weights_path).get("classes")
            theirs = [str(x) for x in (meta_classes or {}).get("source_labels", [])]
            if theirs and theirs != classes.source_labels:
                raise ImatError(
                    f"teacher {e.name}: its class map differs from the run's manifest ({e.weights_path})"
                )
        model = load_teacher(e, device)
        out.append(
            FrozenTeacher(
                e.name,
                model,
                int(e.input_size),
                tuple(e.mean),
                tuple(e.std),
                cfg.distill.teacher_train_mode,
                e.val_top1,
            )
        )
    return out


# -- checks ------------------------------------------------------------------------------------------


def check_method(dcfg: DistillConfig) -> None:
    """Consistency of the config (no networks needed): the method's own checks, then the shared ones."""
    method = get_method(dcfg.method)
    method.settings(dcfg)  # unknown distill.options
    method.check(dcfg)
    for i, b in enumerate(dcfg.blocks):
        if b.index != "logits" and b.length is None:
            raise ImatError(f"distill.blocks.{i}.length: stage block {b.index} needs a pooled length L_k")
    widths = dcfg.adversarial.widths
    if isinstance(widths, list) and any(w < 1 for w in widths):
        raise ImatError(
            f"distill.adversarial.widths: every width must be >= 1 (got {dcfg.adversarial.widths})"
        )
    aug = dcfg.train.aug
    if dcfg.cache.enabled and method.needs_teachers and (aug.mixup > 0 or aug.cutmix > 0):
        # consistent teaching: a teacher must score the very (mixed) image the student sees
        raise ImatError(
            "distill.train.aug: mixup/cutmix need the teachers online (they score the mixed image); "
            "set distill.cache.enabled=false or mixup=0 and cutmix=0"
        )
    adv = dcfg.adversarial
    if adv.enabled and adv.mode != "alternating" and adv.optimizer not in ("same", "auto"):
        # grl and joint update student and discriminators in one step with the student's optimiser
        raise ImatError(
            f"distill.adversarial.optimizer: {adv.optimizer!r} needs mode alternating (the discriminators "
            f"have their own optimiser only there), not {adv.mode!r}"
        )
    if adv.enabled and adv.mode == "joint" and adv.weight not in (None, 1.0):
        raise ImatError(
            f"distill.adversarial.weight: joint mode adds the discriminators' loss as it is (the official "
            f"code); weight {adv.weight} applies to alternating and grl"
        )


def build_task(
    cfg: RunConfig,
    student: nn.Module,
    student_data: dict[str, Any],
    teachers: list[FrozenTeacher],
    num_classes: int,
    cache: Any = None,
) -> DistillTaskBase:
    """The engine task of ``cfg.distill.method``, built by the method from the config section."""
    from imat.data.mixing import build_label_mass_mixup

    dcfg = cfg.distill
    seed = dcfg.seed if dcfg.seed is not None else dcfg.train.seed
    ensemble = (
        TeacherEnsemble(
            teachers, default_selection(dcfg, teachers), seed, selection_probabilities(dcfg, teachers)
        )
        if teachers
        else None
    )
    inputs = MethodInputs(
        student=student,
        student_data=student_data,
        teachers=teachers,
        ensemble=ensemble,
        num_classes=num_classes,
        cache=cache,
        mixup=build_label_mass_mixup(dcfg.train.aug, num_classes),
    )
    return get_method(dcfg.method).build_task(dcfg, inputs)


# -- data --------------------------------------------------------------------------------------------


def run_manifest(cfg: RunConfig, pool_dir: Path) -> tuple[pd.DataFrame, ClassMap, Path]:
    """The manifest the teachers were trained on: the run's, else the one pool.json points to, else
    one built from ``cfg.data``."""
    run_manifest_path = cfg.manifest_path
    if not run_manifest_path.is_file():
        from teachers.pool import read_pool_json

        rel = read_pool_json(pool_dir, missing_ok=True).get("manifest")
        if rel:
            p = (pool_dir / rel).resolve()
            if p.is_file():
                df, classes = load_manifest(p)
                return df, classes, p
    return prepare_manifest(cfg)


def images_root(cfg: RunConfig, pool_dir: Path) -> str | None:
    if cfg.data.images:
        return cfg.data.images
    from teachers.pool import read_pool_json

    return read_pool_json(pool_dir, missing_ok=True).get("images")


def split_with_noise(
    cfg: RunConfig, df: pd.DataFrame, classes: ClassMap, manifest: Path, out_dir: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Labelled train and val rows; ``data.label_noise`` corrupts train labels (seeded, as the teachers'
    were) and the flipped mask is recorded in ``out_dir/label_noise.csv``."""
    from imat.data import run_splits

    train_df, val_df, clean = run_splits(cfg, df, classes.num_classes)  # data.clean applies here too
    if train_df.empty:
        raise ImatError(f"{manifest}: no labelled train images to distil on (set data.train)")
    if clean is not None:
        noisy = train_df["label"].to_numpy()
        record = pd.DataFrame(
            {
                "image_id": train_df["image_id"],
                "clean_label": clean,
                "noisy_label": noisy,
                "flipped": clean != noisy,
            }
        )
        write_csv(out_dir / "label_noise.csv", record)
    return train_df, val_df


def extra_rows(
    cfg: RunConfig, df: pd.DataFrame, train_df: pd.DataFrame, val_df: pd.DataFrame, root: str | None
) -> pd.DataFrame:
    """``distill.extra_images`` as unlabelled train rows (label -1): the soft targets need no labels.

    Images that are already training or validation rows are dropped (same resolved file), so the extra
    set can never leak the validation split into training."""
    from imat.data.dataset import resolve_paths
    from imat.data.sources import read_images

    source = cfg.distill.extra_images
    assert source is not None
    if source == "test":
        extra = df[df["split"] == "test"]
        if extra.empty:
            raise ImatError("distill.extra_images: 'test' but the manifest has no test split (set data.test)")
        extra = extra.assign(path=resolve_paths(extra, root))
    else:
        extra = read_images(source, cfg.data.images)
    known = set(resolve_paths(train_df, root)) | set(resolve_paths(val_df, root))
    extra = extra[~extra["path"].astype(str).isin(known)]
    if extra.empty:
        raise ImatError(f"distill.extra_images: {source}: no images beyond the train and val splits")
    rows = pd.DataFrame(
        {
            "image_id": "extra/" + extra["image_id"].astype(str),
            "split": "train",
            "path": extra["path"].astype(str).to_numpy(),
            "label": -1,
            "source_label": "",
        }
    )
    return rows.reindex(columns=train_df.columns, fill_value="")


def with_extra_images(
    cfg: RunConfig, df: pd.DataFrame, train_df: pd.DataFrame, val_df: pd.DataFrame, root: str | None
) -> pd.DataFrame:
    """The student's training rows: the labelled ones plus ``distill.extra_images`` (when set)."""
    dcfg = cfg.distill
    if dcfg.extra_images is None:
        return train_df
    if not get_method(dcfg.method).needs_teachers:
        taught = [n for n in method_names() if get_method(n).needs_teachers]
        raise ImatError(
            f"distill.extra_images: method {dcfg.method} learns from labels only; use {', '.join(taught)}"
        )
    if dcfg.train.aug.balanced_sampler:
        raise ImatError("distill.extra_images: the balanced sampler needs a label on every image")
    extra = extra_rows(cfg, df, train_df, val_df, root)
    log.info("distill: %d labelled + %d extra unlabelled training images", len(train_df), len(extra))
    return pd.concat([train_df, extra], ignore_index=True)


def build_loaders(
    cfg: RunConfig, data_cfg: dict[str, Any], train_df: pd.DataFrame, val_df: pd.DataFrame, root: str | None
) -> tuple[Any, Any]:
    """The student's loaders: its recipe (``distill.train``) on the run's images."""
    from imat.data import recipe_loaders

    return recipe_loaders(
        cfg.distill.train,
        data_cfg,
        train_df,
        val_df,
        images=root,
        decoder=cfg.data.decoder,
        num_workers=cfg.data.num_workers,
        max_pixels=cfg.data.max_pixels,
        draft=cfg.data.draft,
        decode=cfg.data.decode,
    )


def student_meta(
    dcfg: DistillConfig, data_cfg: dict[str, Any], classes: ClassMap, teachers: list[FrozenTeacher]
) -> dict[str, Any]:
    probs = selection_probabilities(dcfg, teachers) if teachers else None
    return {
        "kind": "student",
        "method": dcfg.method,
        "arch": dcfg.student.arch,
        "num_classes": classes.num_classes,
        "input_size": data_cfg["input_size"],
        "mean": data_cfg["mean"],
        "std": data_cfg["std"],
        "crop_pct": data_cfg["crop_pct"],
        "model_kwargs": dict(dcfg.student.model_kwargs),
        "classes": classes.to_dict(),
        "teachers": [t.name for t in teachers],
        "teacher_selection": default_selection(dcfg, teachers) if teachers else None,
        "teacher_probabilities": dict(zip([t.name for t in teachers], probs, strict=True)) if probs else None,
    }


# -- the whole step ----------------------------------------------------------------------------------


def distill(cfg: RunConfig, *, resume: bool = False, progress: bool = True) -> pd.DataFrame:
    """Train the student of ``cfg`` into ``RUN_DIR/student/``; returns the engine's per-epoch summary."""
    from imat.engine import Engine, seed_everything

    dcfg = cfg.distill
    check_method(dcfg)
    out_dir = cfg.run_path / STUDENT_DIR
    pool_dir = pool_dir_of(cfg)
    needs_teachers = get_method(dcfg.method).needs_teachers
    if needs_teachers and not (pool_dir / "pool.json").is_file():
        raise ImatError(f"teacher pool not found: {pool_dir / 'pool.json'} (run `imat teachers train` first)")
    df, classes, manifest = run_manifest(cfg, pool_dir)
    # built after the run's seed (the same on every rank): one seed, one initial student for every
    # method; the discriminators and heads built later draw from it too
    seed_everything(dcfg.train.seed)
    student, data_cfg = build_student(dcfg, classes.num_classes)
    teachers = load_frozen_teachers(cfg, pool_dir, classes) if needs_teachers else []
    out_dir.mkdir(parents=True, exist_ok=True)
    train_df, val_df = split_with_noise(cfg, df, classes, manifest, out_dir)
    root = images_root(cfg, pool_dir)
    train_df = with_extra_images(cfg, df, train_df, val_df, root)
    cache = None
    if dcfg.cache.enabled and needs_teachers:
        from distill.cache_build import prepare_cache

        cache, train_loader, val_loader = prepare_cache(
            cfg, teachers, data_cfg, train_df, val_df, root, out_dir
        )
    else:
        train_loader, val_loader = build_loaders(cfg, data_cfg, train_df, val_df, root)
    task = build_task(cfg, student, data_cfg, teachers, classes.num_classes, cache)
    save_resolved(cfg, cfg.run_path / "config.yaml")
    save_resolved(cfg, out_dir / "config.yaml")
    log.info(
        "distill: %s into %s (%d classes) from %s",
        dcfg.method,
        dcfg.student.arch,
        classes.num_classes,
        ", ".join(t.name for t in teachers) or "labels only",
    )
    engine = Engine(
        task,
        dcfg.train,
        out_dir,
        train_loader,
        val_loader,
        meta=student_meta(dcfg, data_cfg, classes, teachers),
        log_name=f"distill-{dcfg.method}",
        progress=progress,
    )
    summary = engine.fit(resume=resume and (out_dir / "last.ckpt").is_file())
    return mark_adversarial(summary, out_dir / "summary.csv")


def adversarial_status(summary: pd.DataFrame) -> str | None:
    """ "inert" when every discriminator stayed at chance in every epoch, "learning" otherwise; None
    without discriminators. Read from the per-epoch balanced accuracies ``d_acc_b{k}``."""
    from distill.discriminator import is_inert

    cols = [c for c in summary.columns if c.startswith("d_acc_b")]
    if not cols or summary.empty:
        return None
    return "inert" if is_inert(summary[cols].to_numpy().ravel()) else "learning"


def mark_adversarial(summary: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Add the ``adversarial`` column to the summary (and its CSV) and say it when the term was inert."""
    from imat.engine.runtime import is_main_process

    status = adversarial_status(summary)
    if status is None:
        return summary
    summary = summary.assign(adversarial=status)
    if is_main_process():
        write_csv(path, summary)
    if status == "inert":
        log.warning(
            "distill: adversarial term inert: every discriminator stayed at chance (balanced accuracy "
            "within 0.5 +- 0.05) for the whole run; see the d_acc_b* columns of %s",
            path,
        )
    return summary
