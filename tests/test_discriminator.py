"""MEAL's discriminators: widths, initialisation, input normalisation, spectral norm, conditioning on
the teacher's class, and the chance-level verdict."""

from __future__ import annotations

import pytest
import torch
from meal_kit import make_meal

from distill.discriminator import (
    Discriminator,
    accuracy,
    bce,
    block_input_norm,
    discriminator_loss,
    is_inert,
    normalize_input,
)


def _linear_widths(d):
    return [m.out_features for m in d.net if isinstance(m, torch.nn.Linear)]


def test_discriminator_widths_and_output():
    # default: at least 64 and 32 hidden units (d/2, d/4 when wider); "paper" keeps MEAL's d/2, d/4 + ReLU
    assert _linear_widths(Discriminator(40)) == [64, 32, 1]
    assert _linear_widths(Discriminator(400)) == [200, 100, 1]
    paper = Discriminator(40, "paper")
    assert _linear_widths(paper) == [20, 10, 1]
    assert any(isinstance(m, torch.nn.ReLU) for m in paper.net)
    d = Discriminator(40)
    assert not any(isinstance(m, torch.nn.ReLU) for m in d.net)  # LeakyReLU: no dead units
    assert d(torch.randn(3, 40)).shape == (3,)
    assert d(torch.randn(1, 40)).shape == (1,)
    assert _linear_widths(Discriminator(8, [16])) == [16, 1]
    # the last layer is a plain Linear: D can say "student" (negative logits)
    assert isinstance(d.net[-1], torch.nn.Linear) and isinstance(paper.net[-1], torch.nn.Linear)


@pytest.mark.parametrize("dim", [5, 10])
def test_default_discriminators_are_never_dead_at_initialisation(dim):
    # The paper's 5 -> 2 -> 1 ReLU MLP passes exactly zero gradient for some seeds (69 in 500 at 5
    # classes): the adversarial term is then inert. The defaults must always pass gradient to the student.
    x = torch.randn(64, dim)
    dead = {"default": 0, "paper": 0}
    for seed in range(200):
        for kind, widths in (("default", None), ("paper", "paper")):
            torch.manual_seed(seed)
            d = Discriminator(dim, widths)
            xi = x.clone().requires_grad_(True)
            bce(d(xi), 1.0).backward()
            dead[kind] += int(float(xi.grad.abs().sum()) == 0.0)
    assert dead["default"] == 0
    assert dead["paper"] > 0  # the failure the defaults avoid is real


def test_discriminator_input_normalisation_compares_distributions():
    # log_softmax input: a per-sample shift of the logits (meaningless for a classifier) is invisible,
    # and cached log-probabilities pass through unchanged.
    torch.manual_seed(0)
    d = Discriminator(10)
    z = torch.randn(4, 10)
    assert torch.allclose(d(z), d(z + 7.0), atol=1e-5)
    assert torch.allclose(d(z), d(torch.log_softmax(z, -1)), atol=1e-5)
    raw = Discriminator(10, input_norm="none")
    assert not torch.allclose(raw(z), raw(z + 7.0), atol=1e-3)


def test_stage_block_discriminators_see_standardised_vectors_by_default():
    """A stage block's aligned vector (channel means at pooled positions) varies by hundredths: its
    log-softmax is nearly flat, standardising it gives D unit-scale inputs; logits stay log-probabilities."""
    assert block_input_norm("auto", "logits") == "log_softmax"
    assert block_input_norm("auto", 2) == "standardize"
    assert block_input_norm("none", 2) == "none"
    task = make_meal("alternating")  # blocks [2, "logits"], input_norm left at its default
    assert [d.input_norm for d in task.discriminators] == ["standardize", "log_softmax"]
    v = 0.5 + 0.01 * torch.randn(4, 16)
    assert float(torch.log_softmax(v, -1).std(-1).max()) < 0.05  # what log_softmax would show D
    assert torch.allclose(normalize_input(v, "standardize").std(-1), torch.ones(4), atol=1e-5)


def test_spectral_norm_bounds_every_layer():
    torch.manual_seed(0)
    d = Discriminator(10, spectral_norm=True)
    for _ in range(20):  # power iterations converge in train mode
        d(torch.randn(8, 10))
    d.eval()
    for m in d.net:
        if isinstance(m, torch.nn.Linear):
            assert torch.linalg.matrix_norm(m.weight, ord=2) <= 1.0 + 1e-3


def peaked(classes: torch.Tensor, n_classes: int, confidence: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax puts ``confidence`` on ``classes``, the rest spread evenly."""
    rest = (1 - confidence) / (n_classes - 1)
    probs = rest.unsqueeze(-1).expand(-1, n_classes).clone()
    probs.scatter_(1, classes.unsqueeze(-1), confidence.unsqueeze(-1))
    return probs.log()


def test_conditional_discriminator_sees_a_wrong_class_the_unconditional_one_cannot():
    """Teacher and student outputs with the SAME distribution of vectors (equally confident, uniform
    classes) but the student on the wrong class for 60% of the images: only a D that knows the teacher's
    class for each image can tell them apart; an unconditional D stays at chance."""
    torch.manual_seed(0)
    c, n = 10, 256

    def draw():
        t_cls = torch.randint(0, c, (n,))
        wrong = torch.rand(n) < 0.6
        s_cls = torch.where(wrong, (t_cls + torch.randint(1, c, (n,))) % c, t_cls)
        conf_t, conf_s = 0.5 + 0.45 * torch.rand(n), 0.5 + 0.45 * torch.rand(n)
        return peaked(t_cls, c, conf_t), peaked(s_cls, c, conf_s), t_cls

    results = {}
    for name, classes in (("unconditional", None), ("conditional", c)):
        d = Discriminator(c, num_classes=classes)
        opt = torch.optim.Adam(d.parameters(), lr=3e-3, betas=(0.5, 0.999))
        for _ in range(300):
            t, s, t_cls = draw()
            cond = t_cls if classes else None
            opt.zero_grad()
            discriminator_loss(d, t, s, cond).backward()
            opt.step()
        t, s, t_cls = draw()  # fresh images
        a_t, a_s = accuracy(d, t, s, t_cls if classes else None)
        results[name] = (a_t + a_s) / 2
    assert abs(results["unconditional"] - 0.5) < 0.1
    assert results["conditional"] > 0.7  # 60% wrong: at most 0.8 (a right-class student is a teacher)


def test_conditional_discriminator_needs_the_class_and_starts_from_the_unconditional_one():
    d = Discriminator(10, num_classes=10)
    with pytest.raises(ValueError, match="needs the class"):
        d(torch.randn(2, 10))
    sn = Discriminator(10, num_classes=10, spectral_norm=True)
    assert sn(torch.randn(3, 10), torch.tensor([0, 1, 9])).shape == (3,)
    assert float(d.embed.weight.detach().abs().max()) < 0.2  # small: the class term grows only as D learns it


def test_inert_is_chance_everywhere():
    assert is_inert([0.5, 0.52, 0.47])
    assert not is_inert([0.5, 0.62, 0.5])
    assert not is_inert([])


def test_discriminator_step_lowers_its_loss():
    torch.manual_seed(0)
    d = Discriminator(10)
    t, s = torch.randn(16, 10) * 4, torch.randn(16, 10)  # a confident teacher, an unsure student
    opt = torch.optim.SGD(d.parameters(), lr=0.1)
    before = float(discriminator_loss(d, t, s).detach())
    for _ in range(5):
        opt.zero_grad()
        discriminator_loss(d, t, s).backward()
        opt.step()
    assert float(discriminator_loss(d, t, s).detach()) < before
