"""The DMD2 distribution-matching gradient of bridge.py on an analytic problem; DMD2's GAN losses likewise.

The "teacher" is a Gaussian N(mu, Sigma) whose denoiser under flow-matching noising x_s = (1-s) x0 + s n is exact:
    E[x0 | x_s] = mu + (1-s) Sigma ((1-s)^2 Sigma + s^2 I)^-1 (x_s - (1-s) mu).
A generator x = A n + b is trained with dmd_generator_loss; the fake score (v affine in x_s, separate parameters
per sigma on a fixed grid: the exact fake denoiser of a Gaussian generator is of this form) is fitted online with
flow_matching_loss on detached generator samples, several fake steps per generator step (two time scales).
"""
import pytest
import torch

from bridge import RealismHead, dmd_generator_loss, flow_matching_loss, gan_critic_loss, gan_generator_loss, x0_from_v

MU = torch.tensor([1.5, -1.0, 0.5])
L = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.7, 0.0], [-0.3, 0.2, 0.5]])
SIGMA = L @ L.T


def real_x0(xs, s):
    """Exact E[x0 | x_s] of the Gaussian teacher; xs (B, d), s (B,)."""
    d = xs.shape[1]
    s3 = s[:, None, None]
    M = (1 - s3) * SIGMA @ torch.linalg.inv((1 - s3) ** 2 * SIGMA + s3 ** 2 * torch.eye(d))  # (B, d, d)
    return MU + (M @ (xs - (1 - s[:, None]) * MU)[..., None])[..., 0]


def train(sign=1.0, steps=600, fake_steps=5, batch=256, seed=0):
    """Returns (|b - mu|, ||A A^T - Sigma|| / ||Sigma||) after DMD training; sign=-1 flips the generator gradient."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    d, grid = 3, torch.linspace(0.1, 0.9, 8)
    A, b = torch.eye(d).requires_grad_(), torch.zeros(d).requires_grad_()
    P, q = torch.zeros(len(grid), d, d).requires_grad_(), torch.zeros(len(grid), d).requires_grad_()
    gopt = torch.optim.Adam([A, b], lr=2e-2, betas=(0.0, 0.99))  # beta1 0: DMD2 uses low momentum for the generator
    fopt = torch.optim.Adam([P, q], lr=3e-2, betas=(0.0, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(gopt, lambda i: 1 - 0.9 * i / steps)
    fake_v = lambda xs, k: (P[k] @ xs[..., None])[..., 0] + q[k]
    sample = lambda n: torch.randn(n, d, generator=g) @ A.T + b

    def noised(x0):
        k = torch.randint(len(grid), (batch,), generator=g)
        s, noise = grid[k], torch.randn(batch, d, generator=g)
        return k, s, noise, (1 - s[:, None]) * x0 + s[:, None] * noise

    for it in range(steps):
        for _ in range(fake_steps if it else 200):  # warm-start the fake score on the initial generator
            with torch.no_grad():
                x0 = sample(batch)
            k, _, noise, xs = noised(x0)
            loss = flow_matching_loss(fake_v(xs, k), x0, noise)
            fopt.zero_grad()
            loss.backward()
            fopt.step()
        x = sample(batch)
        k, s, _, xs = noised(x.detach())
        with torch.no_grad():
            x0_real, x0_fake = real_x0(xs, s), x0_from_v(xs, s, fake_v(xs, k))
        loss = sign * dmd_generator_loss(x, x0_real, x0_fake)
        gopt.zero_grad()
        loss.backward()
        gopt.step()
        sched.step()
    with torch.no_grad():
        return (b - MU).norm().item(), ((A @ A.T - SIGMA).norm() / SIGMA.norm()).item()


def test_dmd_converges_to_teacher():
    start = (MU.norm().item(), ((torch.eye(3) - SIGMA).norm() / SIGMA.norm()).item())  # ~1.87, ~0.65
    mean_err, cov_err = train()
    assert mean_err < 0.05 and cov_err < 0.08, (mean_err, cov_err, start)


def test_dmd_flipped_sign_diverges():
    mean_err, cov_err = train(sign=-1.0, steps=150)
    assert mean_err > 2.0 and cov_err > 1.0, (mean_err, cov_err)  # worse than the start (1.87, 0.65)


def test_dmd_loss_gradient_and_sign():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 8, 8, requires_grad=True)
    x0_real, x0_fake = torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)
    dmd_generator_loss(x, x0_real, x0_fake).backward()
    w = (x.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(x.grad, (x0_fake - x0_real) / w / x.numel(), rtol=1e-5, atol=1e-9)
    # a small descent step brings x0_real-ward: <x.grad, x0_real - x0_fake> < 0
    assert (x.grad * (x0_real - x0_fake)).sum() < 0
    # x0_real == x0_fake: no gradient; x == x0_real (w = 0): finite
    y = torch.randn(2, 3, requires_grad=True)
    dmd_generator_loss(y, y.detach(), y.detach()).backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().max() == 0


def test_x0_from_v_and_flow_matching_loss():
    torch.manual_seed(0)
    x0, noise, s = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4), torch.tensor([0.1, 0.5, 0.9])
    xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
    v = noise - x0
    torch.testing.assert_close(x0_from_v(xs, s, v), x0, rtol=1e-5, atol=1e-5)
    assert flow_matching_loss(v, x0, noise).item() == 0
    assert flow_matching_loss(v + 0.1, x0, noise).item() == pytest.approx(0.01, rel=1e-4)


def train_gan(sign=1.0, steps=250, critic_steps=2, batch=256, seed=0):
    """|b - mu| after GAN training of a generator x = b + n against real samples mu + n (n ~ N(0, I)): the critic is
    the RealismHead itself, reading each sample as one 16-d token (a fixed random embedding: its LayerNorm would
    flatten 3-d tokens); sign=-1 flips the generator's loss."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(3, 16, generator=g) / 3 ** 0.5
    b, head = torch.zeros(3, requires_grad=True), RealismHead(16)
    gopt = torch.optim.Adam([b], lr=2e-2, betas=(0.0, 0.99))
    copt = torch.optim.Adam(head.parameters(), lr=1e-2, betas=(0.0, 0.99))
    tokens = lambda mean: (mean + torch.randn(batch, 1, 3, generator=g)) @ embed  # (B, 1 token, 16)
    for _ in range(steps):
        for _ in range(critic_steps):
            loss = gan_critic_loss(head(tokens(MU)), head(tokens(b.detach())))
            copt.zero_grad()
            loss.backward()
            copt.step()
        loss = sign * gan_generator_loss(head(tokens(b)))
        gopt.zero_grad()
        loss.backward()
        gopt.step()
    return (b - MU).norm().item()


def test_gan_losses():
    logit = torch.tensor([-3.0, -0.5, 0.0, 2.0])
    sig = torch.sigmoid(logit)
    torch.testing.assert_close(gan_generator_loss(logit), -sig.log().mean())  # -log D(fake)
    real, fake = logit, logit.flip(0)  # -log D(real) - log(1 - D(fake))
    torch.testing.assert_close(gan_critic_loss(real, fake), -(sig.log().mean() + (1 - sig.flip(0)).log().mean()))
    head = RealismHead(8)
    assert head(torch.randn(5, 7, 8)).shape == (5,)


def test_gan_generator_moves_to_the_real_data():
    assert MU.norm().item() == pytest.approx(1.87, abs=0.01)  # the start
    assert train_gan() < 0.1
    assert train_gan(sign=-1.0, steps=150) > 3.0
