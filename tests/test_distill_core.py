"""The parts of MEAL that need no engine: aligner, losses, GRL, blocks, teachers, the step (the
discriminators are in test_discriminator.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from meal_kit import (
    MEAN,
    STD,
    Ctx,
    batch,
    capture_vectors,
    d_loss_on,
    d_student_logit,
    make_meal,
    meal_task,
    tiny,
)

from distill.align import align
from distill.blocks import extract_blocks, num_blocks, resolve_index
from distill.grl import grad_reverse
from distill.losses import kl_divergence, similarity, soft_cross_entropy, teacher_probs
from distill.methods.ce import CETask
from distill.methods.kd import KDTask, SoftTargets
from distill.teachers_runtime import FrozenTeacher, TeacherEnsemble
from imat.errors import ImatError


def test_align_shapes_lengths_and_channels():
    for c, hw in ((64, 4), (512, 1), (3, 7)):
        for L in (1, 10, 100):
            out = align(torch.randn(2, c, hw, hw), L)
            assert out.shape == (2, L)
    # different channel counts and spatial sizes map to the same length
    assert align(torch.randn(3, 16, 8, 8), 20).shape == align(torch.randn(3, 256, 2, 2), 20).shape


def test_align_batch_of_one_keeps_batch_axis():
    assert align(torch.randn(1, 8, 1, 1), 1).shape == (1, 1)
    assert align(torch.randn(1, 8, 3, 3), 5, "max", "max").shape == (1, 5)
    logits = torch.randn(1, 5)
    assert align(logits, None) is logits


def test_align_upsamples_by_repetition_and_reduces_channels():
    x = torch.tensor([[[[1.0, 3.0]], [[3.0, 5.0]]]])  # (1, 2, 1, 2)
    # spatial axis 2 -> 4 repeats each position, then the channel mean
    assert torch.allclose(align(x, 4), torch.tensor([[2.0, 2.0, 4.0, 4.0]]))
    assert torch.allclose(align(x, 4, "max", "max"), torch.tensor([[3.0, 3.0, 5.0, 5.0]]))
    assert torch.allclose(align(x, 1, "avg", "avg"), torch.tensor([[3.0]]))
    assert torch.allclose(align(x, 1, "max", "avg"), torch.tensor([[4.0]]))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_soft_ce_gradient_equals_kl_gradient(temperature):
    torch.manual_seed(0)
    t = torch.randn(6, 10)
    p = F.softmax(t / temperature, -1)
    s1 = torch.randn(6, 10, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    ce = soft_cross_entropy(s1, p, temperature)
    kl = kl_divergence(s2, p, temperature)
    ce.backward()
    kl.backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)
    # they differ by the teacher's entropy (times T^2), a constant
    ent = -(p * p.log()).sum(-1).mean() * temperature**2
    assert torch.allclose(ce - kl, ent, atol=1e-5)


def test_similarity_kinds_are_zero_at_the_teacher_and_positive_elsewhere():
    t = torch.randn(4, 7)
    s = torch.randn(4, 7)
    for kind in ("kl", "l1", "l2", "l1_soft", "l2_soft"):
        assert similarity(kind, t.clone(), t) == pytest.approx(0.0, abs=1e-6)
        assert similarity(kind, s, t) > 0
    assert similarity("ce", s, t) > similarity("ce", t.clone(), t)
    with pytest.raises(ValueError):
        similarity("cosine", s, t)


def test_teacher_probs_is_the_mean_of_softmaxes():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.allclose(teacher_probs([a, b]), (F.softmax(a, -1) + F.softmax(b, -1)) / 2)
    assert torch.allclose(teacher_probs([a], 2.0), F.softmax(a / 2, -1))


def test_grl_reverses_and_scales_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    grad_reverse(x, 0.5).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, -0.5))
    assert torch.equal(grad_reverse(x, 2.0), x)


def test_blocks_from_one_pass_and_index_checks():
    m = tiny(0).eval()
    assert num_blocks(m) == 5
    x = torch.randn(2, 3, 32, 32)
    outs = extract_blocks(m, x, [0, 4, "logits"])
    assert outs[0].shape == (2, 64, 16, 16) and outs[1].shape == (2, 512, 1, 1)
    assert torch.allclose(outs[2], m(x), atol=1e-5)
    assert resolve_index(-1, 5, "resnet10t") == 4
    with pytest.raises(ImatError, match="block index 5 does not exist in resnet10t"):
        resolve_index(5, 5, "resnet10t")


def test_teacher_prepare_renormalises_and_resizes():
    img = torch.rand(2, 3, 32, 32)
    x_student = (img - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    t_mean, t_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    teacher = FrozenTeacher("t", tiny(1), 48, t_mean, t_std)
    got = teacher.prepare(x_student, MEAN, STD)
    want = (img - torch.tensor(t_mean).view(1, 3, 1, 1)) / torch.tensor(t_std).view(1, 3, 1, 1)
    want = F.interpolate(want, size=(48, 48), mode="bilinear", align_corners=False)
    assert got.shape == (2, 3, 48, 48)
    assert torch.allclose(got, want, atol=1e-5)


def test_selection_random_and_mean_and_pick_counts():
    ts = [FrozenTeacher(f"t{i}", tiny(i), 32, MEAN, STD) for i in range(3)]
    ens = TeacherEnsemble(ts, "random", seed=1)
    for _ in range(300):
        assert len(ens.pick()) == 1
    counts = ens.pick_counts()
    assert sum(counts.values()) == 300 and all(60 < v < 140 for v in counts.values())
    assert ens.pick_counts() == {"pick_t0": 0.0, "pick_t1": 0.0, "pick_t2": 0.0}  # reset
    mean = TeacherEnsemble(ts, "mean")
    assert mean.pick() == [0, 1, 2]
    # seeded: the same seed gives the same draws, also after a state round trip
    a, b = TeacherEnsemble(ts, "random", seed=7), TeacherEnsemble(ts, "random", seed=7)
    state = a.state_dict()
    seq_a = [a.pick()[0] for _ in range(20)]
    b.load_state_dict(state)
    assert seq_a == [b.pick()[0] for _ in range(20)]


@pytest.mark.parametrize(
    "mode, condition",
    [("alternating", "none"), ("grl", "none"), ("joint", "none"), ("alternating", "teacher_class")],
)
def test_adversarial_modes_discriminator_and_student_steps(mode, condition):
    task = make_meal(mode, gamma=0.0, condition=condition)  # isolate the adversarial game
    task.model.eval()  # deterministic forwards for before/after comparisons
    b = batch()
    ctx = Ctx(task, lr=0.05)
    seen = capture_vectors(task)
    d_before = copy.deepcopy(task.discriminators)
    out = ctx.run(task, b)
    s_vecs, t_raw, _, _ = seen[0]
    cls = task.teacher_class if condition == "teacher_class" else None
    if cls is not None:  # the teacher's own prediction, per image
        with torch.no_grad():
            want = task.ensemble.teachers[0].blocks(b["image"], ["logits"], MEAN, STD)[0].argmax(-1)
        assert torch.equal(cls, want)
    assert set(out) >= {"loss", "d_loss", "sim", "sim_b0", "sim_b1"}
    if mode == "alternating":
        assert ctx.calls == ["disc", "main"] and task.manual_optimization
        assert "adv" in out
    else:
        assert ctx.calls == [] and not task.manual_optimization
        assert set(ctx.opts) == {"main"} and len(ctx.opts["main"].param_groups) == 2
    # the discriminator step lowered D's loss on the vectors it was trained on
    assert d_loss_on(task.discriminators, t_raw, s_vecs, cls) < d_loss_on(d_before, t_raw, s_vecs, cls)
    # the student step: with D as it is after the step, the student's new vectors look more (or, in
    # the official joint mode, less) like a teacher to D than its old ones
    with torch.no_grad():
        new_s, _, _, _ = task.vectors(b, ctx)
    before = d_student_logit(task.discriminators, s_vecs, cls)
    after = d_student_logit(task.discriminators, new_s, cls)
    if mode == "joint":
        assert after < before  # the documented defect: the student minimises D's loss too
    else:
        assert after > before  # the student raised D's error on student vectors


def test_alternating_student_step_does_not_train_discriminators():
    task = make_meal("alternating")
    ctx = Ctx(task)
    snapshots = {}
    orig = ctx.optimize

    def optimize(name, loss):
        orig(name, loss)
        snapshots[name] = copy.deepcopy(task.discriminators.state_dict())

    ctx.optimize = optimize
    ctx.run(task, batch())
    for k, v in snapshots["disc"].items():
        assert torch.equal(v, snapshots["main"][k])


@pytest.mark.parametrize("train_mode", [False, True])
def test_teachers_unchanged_after_training_steps(train_mode):
    task = make_meal("alternating", teachers=2, train_mode=train_mode)
    before = [copy.deepcopy(t.model.state_dict()) for t in task.ensemble.teachers]
    ctx = Ctx(task)
    for i in range(3):
        ctx.run(task, batch(seed=i))
    for t, sd in zip(task.ensemble.teachers, before, strict=True):
        assert t.model.training is train_mode
        assert all(not p.requires_grad and p.grad is None for p in t.model.parameters())
        for k, v in t.model.state_dict().items():
            assert torch.equal(v, sd[k]), k  # weights and BN running stats / counters
    extras = task.epoch_extras()
    assert extras["pick_t0"] + extras["pick_t1"] == 3
    assert {"d_acc_teacher_b0", "d_acc_student_b1"} <= set(extras)
    assert 0.0 <= extras["d_acc_teacher_b0"] <= 1.0


def test_single_teacher_and_no_discriminator_ablation():
    task = make_meal("alternating", teachers=1, adversarial=False)
    assert not task.manual_optimization and set(task.param_groups()) == {"main"}
    assert "disc" not in task.modules()
    ctx = Ctx(task)
    w0 = copy.deepcopy(task.model.state_dict())
    out = ctx.run(task, batch(n=1, size=64))  # batch of one through every block (BN needs >1 value)
    assert torch.isfinite(out["loss"]) and "d_loss" not in out
    assert any(not torch.equal(v, w0[k]) for k, v in task.model.state_dict().items())
    extras = task.epoch_extras()
    assert extras["pick_t0"] == 1.0 and not any(k.startswith("d_acc") for k in extras)


def test_logits_block_first_still_gives_the_student_logits_to_the_hard_loss():
    student = tiny(100)
    ens = TeacherEnsemble([FrozenTeacher("t0", tiny(0), 32, MEAN, STD)], "mean")
    blocks = ["logits", 2]
    task = meal_task(
        student, ens, blocks, [blocks], [None, 20], 5, hard_label_weight=0.5, adversarial={"enabled": False}
    )
    ctx = Ctx(task)
    b = batch()
    _, _, _, s_logits = task.vectors(b, ctx)
    assert s_logits.shape == (4, 5)
    with torch.no_grad():
        want = student(b["image"])
    assert torch.allclose(s_logits, want, atol=1e-5)
    out = ctx.run(task, b)
    assert torch.isfinite(out["loss"]) and "ce" in out


def test_meal_similarity_decreases_when_training():
    task = make_meal("alternating", teachers=1, adversarial=False)
    ctx = Ctx(task, lr=0.02)
    b = batch(n=8)
    first = float(ctx.run(task, b)["sim"])
    for _ in range(15):
        last = float(ctx.run(task, b)["sim"])
    assert last < first


def test_kd_and_ce_tasks_step():
    student = tiny(3)
    ens = TeacherEnsemble(
        [FrozenTeacher("a", tiny(4), 32, MEAN, STD), FrozenTeacher("b", tiny(5), 32, MEAN, STD)], "mean"
    )
    kd = KDTask(student, SoftTargets(ens, MEAN, STD), alpha=0.7, temperature=2.0)
    out = Ctx(kd).run(kd, batch())
    assert set(out) == {"loss", "kd_soft", "ce"}
    assert torch.allclose(out["loss"].detach(), 0.7 * out["kd_soft"] + 0.3 * out["ce"])
    assert kd.epoch_extras() == {"pick_a": 1.0, "pick_b": 1.0}
    ce = CETask(tiny(3))
    out = Ctx(ce).run(ce, batch())
    assert set(out) == {"loss", "ce"} and float(out["loss"]) > 0


def test_d_steps_updates_the_discriminators_n_times_per_student_step():
    task = make_meal("alternating")
    task.d_steps = 3
    ctx = Ctx(task)
    ctx.run(task, batch())
    assert ctx.calls == ["disc", "disc", "disc", "main"]
    extras = task.epoch_extras()  # accuracy recorded once per step, before D's first update
    assert 0.0 <= extras["d_acc_b0"] <= 1.0


def test_per_teacher_discriminators_train_only_the_drawn_teachers_set():
    task = make_meal("alternating", teachers=2)
    assert len(task.discriminators) == 2  # one per block
    per = make_meal("alternating", teachers=2)
    per = meal_task(
        per.model,
        per.ensemble,
        per.student_indices,
        per.teacher_indices,
        lengths=[20, None],
        num_classes=5,
        adversarial={"mode": "alternating", "lr": 0.05, "per_teacher": True},
    )
    assert len(per.discriminators) == 4  # (teacher, block)
    ctx = Ctx(per)
    before = copy.deepcopy(per.discriminators.state_dict())
    ctx.run(per, batch())
    drawn = per._set
    after = per.discriminators.state_dict()
    changed = {int(k.split(".")[0]) for k in after if not torch.equal(after[k], before[k])}
    assert changed == {2 * drawn, 2 * drawn + 1}  # only the drawn teacher's two discriminators learned
    assert set(per.epoch_extras()) >= {"d_acc_b0", "d_acc_b1"}
