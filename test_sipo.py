"""Tests of sipo.py against independent computations: hand values, explicit Gaussian densities, invariants."""
import math
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import sipo


def neg_logsigmoid(z):
    return math.log1p(math.exp(-z))


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def sd_alphas_cumprod():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def zero_snr_alphas_cumprod():
    """CogVideoX's schedule: scaled_linear, rescaled to zero terminal SNR (Lin et al. 2023, Alg. 1)."""
    abar_sqrt = sd_alphas_cumprod().sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    return abar_sqrt ** 2


# --- Diffusion-DPO -------------------------------------------------------------------------------------

def test_diffusion_dpo_hand_values():
    e_w, e_l = torch.tensor([0.10, 0.30]), torch.tensor([0.30, 0.10])
    r_w, r_l = torch.tensor([0.15, 0.20]), torch.tensor([0.25, 0.10])
    loss, stats = sipo.diffusion_dpo_loss(e_w, e_l, r_w, r_l, beta=10.0)
    # Delta_w = (-0.05, 0.10), Delta_l = (0.05, 0.00); z = -(10/2)(Delta_w - Delta_l) = (0.5, -0.5)
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.5))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(0.7240770, rel=1e-6)
    assert stats["margin"].item() == pytest.approx(0.0, abs=1e-6)
    assert stats["accuracy"].item() == 0.5
    assert stats["err_policy_w"].item() == pytest.approx(0.2)
    assert stats["err_ref_l"].item() == pytest.approx(0.175)


def test_diffusion_dpo_gradient_is_analytic():
    e_w = torch.tensor([0.3, 0.1], requires_grad=True)
    e_l = torch.tensor([0.2, 0.4], requires_grad=True)
    r_w, r_l = torch.tensor([0.25, 0.1]), torch.tensor([0.3, 0.35])
    beta = 4.0
    sipo.diffusion_dpo_loss(e_w, e_l, r_w, r_l, beta)[0].backward()
    for i in range(2):
        z = -(beta / 2) * ((e_w[i] - r_w[i]) - (e_l[i] - r_l[i])).item()
        # dL/de_w = (beta/2) sigmoid(-z) / B; dL/de_l = -(beta/2) sigmoid(-z) / B
        assert e_w.grad[i].item() == pytest.approx(beta / 2 * sigmoid(-z) / 2, rel=1e-5)
        assert e_l.grad[i].item() == pytest.approx(-beta / 2 * sigmoid(-z) / 2, rel=1e-5)


def test_at_initialisation_loss_is_ln2_and_one_step_prefers_the_winner():
    torch.manual_seed(0)
    dim, pairs = 8, 16
    policy = torch.nn.Linear(dim, dim)
    reference = torch.nn.Linear(dim, dim).requires_grad_(False)
    reference.load_state_dict(policy.state_dict())
    abar = sd_alphas_cumprod()
    x0_w, x0_l = torch.randn(pairs, dim), torch.randn(pairs, dim) + 1.0
    t = torch.randint(0, 1000, (pairs,))
    noise = torch.randn(pairs, dim)
    a, s = sipo.ddpm_coefficients(abar, t)

    def errors(net):
        x_t = sipo.add_noise(torch.cat([x0_w, x0_l]), torch.cat([noise, noise]), a.repeat(2), s.repeat(2))
        target = sipo.native_target(torch.cat([x0_w, x0_l]), torch.cat([noise, noise]), a.repeat(2), s.repeat(2),
                                    "epsilon")
        return sipo.per_sample_error(net(x_t), target).chunk(2)

    e_w, e_l = errors(policy)
    with torch.no_grad():
        r_w, r_l = errors(reference)
    loss, stats = sipo.diffusion_dpo_loss(e_w, e_l, r_w, r_l, beta=100.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["margin"].item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            p -= 0.002 * p.grad
        e_w, e_l = errors(policy)
    relative = ((e_w - r_w) - (e_l - r_l)).mean().item()
    assert relative < 0, "one step must lower the winner's error relative to the loser's"
    assert sipo.diffusion_dpo_loss(e_w, e_l, r_w, r_l, beta=100.0)[0].item() < math.log(2)


# --- Noising -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", sipo.PREDICTIONS)
def test_native_target_and_x0_recovery_are_consistent(prediction):
    torch.manual_seed(1)
    x0, noise = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 4, 5, 5, dtype=torch.float64)
    if prediction == "flow":
        a, s = sipo.flow_coefficients(torch.tensor([0.1, 0.5, 0.9]))
    else:
        a, s = sipo.ddpm_coefficients(sd_alphas_cumprod(), torch.tensor([0, 500, 999]))
    a, s = a.double(), s.double()
    x_t = sipo.add_noise(x0, noise, a, s)
    target = sipo.native_target(x0, noise, a, s, prediction)
    assert torch.allclose(sipo.x0_from_prediction(x_t, target, a, s, prediction), x0, atol=1e-9)
    pred = target + 0.1 * torch.randn_like(target)
    x0_error = sipo.per_sample_error(sipo.x0_from_prediction(x_t, pred, a, s, prediction), x0)
    scaled = sipo.per_sample_error(pred, target) * sipo.x0_error_scale(a, s, prediction)
    assert torch.allclose(x0_error, scaled.float(), rtol=1e-5)


def test_snr_and_coefficients_edge_cases():
    abar = zero_snr_alphas_cumprod()
    a, s = sipo.ddpm_coefficients(abar, torch.tensor([999, 0, -5]))
    assert a[0].item() == 0.0 and s[0].item() == 1.0
    assert a[2].item() == 1.0 and s[2].item() == 0.0
    ratio = sipo.snr(a, s)
    assert ratio[0].item() == 0.0 and math.isfinite(ratio[1].item()) and math.isinf(ratio[2].item())
    a, s = sipo.flow_coefficients(torch.tensor([1.0, 0.0, -0.01]))
    assert sipo.snr(a, s).tolist() == [0.0, math.inf, math.inf]
    assert sipo.shift_sigma(torch.tensor([0.0, 0.5, 1.0]), 3.0).tolist() == pytest.approx([0.0, 0.75, 1.0])


def test_per_sample_error_is_float32_mean_over_non_batch_dims():
    pred = torch.zeros(2, 3, 4, dtype=torch.bfloat16)
    target = torch.ones(2, 3, 4, dtype=torch.bfloat16)
    target[1] = 2
    error = sipo.per_sample_error(pred, target)
    assert error.dtype == torch.float32 and error.tolist() == [1.0, 4.0]


# --- The importance weight against a Monte-Carlo estimate from explicit Gaussian densities ----------------

def monte_carlo_log_weight(x0, x0_hat, a_t, s_t, a_s, s_s, x_t, draws=200_000):
    """E_{x_s ~ q(x_s|x_t,x0)}[log p_theta(x_s|x_t) - log q(x_s|x_t,x0)] / D, p_theta = q(.|x_t, x0_hat)."""
    alpha_ts = a_t / a_s
    var_ts = s_t ** 2 - alpha_ts ** 2 * s_s ** 2
    posterior_std = math.sqrt(var_ts * s_s ** 2 / s_t ** 2)

    def posterior_mean(x0_):
        return alpha_ts * s_s ** 2 / s_t ** 2 * x_t + a_s * var_ts / s_t ** 2 * x0_

    q = torch.distributions.Normal(posterior_mean(x0), posterior_std)
    p = torch.distributions.Normal(posterior_mean(x0_hat), posterior_std)
    x_s = q.sample((draws,))
    log_ratio = (p.log_prob(x_s) - q.log_prob(x_s)).sum(-1)
    return log_ratio.mean().item() / x0.numel(), log_ratio.std().item() / math.sqrt(draws) / x0.numel()


def prediction_for(x0_hat, x_t, a, s, prediction):
    """The network output whose x0 estimate is x0_hat, written out per family."""
    eps_hat = (x_t - a * x0_hat) / s
    return {"epsilon": eps_hat, "v": a * eps_hat - s * x0_hat, "flow": eps_hat - x0_hat}[prediction]


CASES = [("epsilon", 500, 480), ("epsilon", 60, 40), ("v", 999, 979), ("v", 600, 580), ("flow", 0.6, 0.58),
         ("flow", 0.95, 0.93)]


@pytest.mark.parametrize("prediction,t,s", CASES)
def test_importance_log_weight_matches_monte_carlo(prediction, t, s):
    torch.manual_seed(2)
    dim = 16
    if prediction == "flow":
        (a_t, s_t), (a_s, s_s) = (1 - t, t), (1 - s, s)
        coef_t = sipo.flow_coefficients(torch.tensor([t]))
        coef_s = sipo.flow_coefficients(torch.tensor([s]))
    else:
        abar = sd_alphas_cumprod() if prediction == "epsilon" else zero_snr_alphas_cumprod()
        (a_t, s_t), (a_s, s_s) = [(abar[k].sqrt().item(), (1 - abar[k]).sqrt().item()) for k in (t, s)]
        coef_t = sipo.ddpm_coefficients(abar, torch.tensor([t]))
        coef_s = sipo.ddpm_coefficients(abar, torch.tensor([s]))
    x0, noise = torch.randn(dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)
    x_t = a_t * x0 + s_t * noise
    gap = a_s ** 2 / s_s ** 2 - a_t ** 2 / s_t ** 2
    x0_hat = x0 + math.sqrt(0.2 / gap) * torch.randn(dim, dtype=torch.float64)  # E[log w] near -0.1
    expected, stderr = monte_carlo_log_weight(x0, x0_hat, a_t, s_t, a_s, s_s, x_t)

    pred = prediction_for(x0_hat, x_t, a_t, s_t, prediction)
    target = sipo.native_target(x0[None], noise[None], *[c.double() for c in coef_t], prediction)
    x0_error = sipo.per_sample_error(pred[None], target) * sipo.x0_error_scale(*coef_t, prediction)
    log_w = sipo.importance_log_weight(x0_error, sipo.snr(*coef_t), sipo.snr(*coef_s))
    assert log_w.dtype == torch.float32
    assert log_w.item() == pytest.approx(expected, abs=5 * stderr + 1e-4)
    assert sipo.importance_log_weight(x0_error, sipo.snr(*coef_t), sipo.snr(*coef_s), temperature=3.0).item() \
        == pytest.approx(3 * log_w.item(), rel=1e-6)


def test_final_step_weight_is_exactly_zero_and_zero_terminal_snr_is_finite():
    abar = zero_snr_alphas_cumprod()
    t = torch.tensor([999, 10, 19, 20])
    coef_t, coef_s = sipo.ddpm_coefficients(abar, t), sipo.ddpm_coefficients(abar, t - 20)
    error = torch.tensor([0.3, 0.0, 0.3, 0.3])
    log_w = sipo.importance_log_weight(error * sipo.x0_error_scale(*coef_t, "v"), sipo.snr(*coef_t),
                                       sipo.snr(*coef_s))
    w = log_w.exp()
    assert math.isfinite(log_w[0].item()) and 0 < w[0].item() <= 1
    assert w[1].item() == 0.0 and w[2].item() == 0.0, "t - stride < 0 is the decoder step: weight 0"
    assert math.isfinite(log_w[3].item())


def test_weight_is_low_near_clean_end_and_high_in_the_middle():
    """docs/method.md §3 with the SD schedule, stride 20 and an epsilon MSE of 0.3 at every t (typical near the
    clean end): w < 0.9 for t <= 50, peaks mid-schedule and dips again near t = 999. The dip needs that error at the
    noisy end, which a model that denoises does not have there (§10: the paper's noisy-end dip is not reproduced)."""
    abar = sd_alphas_cumprod()
    t = torch.arange(20, 1000)
    coef_t, coef_s = sipo.ddpm_coefficients(abar, t), sipo.ddpm_coefficients(abar, t - 20)
    error = torch.full((len(t),), 0.3)
    w = sipo.importance_log_weight(error * sipo.x0_error_scale(*coef_t, "epsilon"), sipo.snr(*coef_t),
                                   sipo.snr(*coef_s)).exp()
    assert (w[t <= 50] < 0.9).all() and (w[t >= 60] > 0.9).all()
    middle = w[(t >= 400) & (t <= 700)].min()
    assert middle > w[t <= 100].max() and middle > w[t >= 950].max()


# --- DPO-C&M and SIPO ------------------------------------------------------------------------------------

def random_batch(pairs=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    e_w, e_l, r_w, r_l = (torch.rand(pairs, generator=g) * 0.2 for _ in range(4))
    log_w_w, log_w_l = (-torch.rand(pairs, generator=g) * 0.3 for _ in range(2))
    log_w_w[0] = -math.inf  # a final-step pair
    return e_w, e_l, r_w, r_l, log_w_w, log_w_l


LOSS_FNS = [sipo.dpo_cm_loss, sipo.sipo_loss]
READINGS = [(weight, normalise) for weight in sipo.WEIGHTS for normalise in sipo.NORMALISATIONS]


def reading_log_weights(log_w_w, log_w_l, weight, seed=5):
    """The step log weights as given, or path log weights built on them from random later terms."""
    if weight == "step":
        return log_w_w, log_w_l
    g = torch.Generator().manual_seed(seed)
    n_later = torch.randint(0, 6, log_w_w.shape, generator=g)
    later = [-torch.rand(2, *log_w_w.shape, generator=g) * 0.05 for _ in range(2)]
    return sipo.path_log_weight(log_w_w, later[0], n_later), sipo.path_log_weight(log_w_l, later[1], n_later)


def on_ranks(fn, shards):
    """fn(shard, all_reduce) on each shard in its own thread, as ranks of one group: all_reduce sums a tensor over
    the threads (a stand-in for torch.distributed's, independent of sipo.py)."""
    barrier, slots, results = threading.Barrier(len(shards), timeout=20), [None] * len(shards), [None] * len(shards)

    def run(rank):
        def all_reduce(tensor):
            slots[rank] = tensor.clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            return total
        results[rank] = fn(shards[rank], all_reduce)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(len(shards))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("weight,normalise", READINGS)
@pytest.mark.parametrize("loss_fn", LOSS_FNS)
def test_clip_and_mask_off_equals_diffusion_dpo(loss_fn, weight, normalise):
    e_w, e_l, r_w, r_l, log_w_w, log_w_l = random_batch()
    log_w_w, log_w_l = reading_log_weights(log_w_w, log_w_l, weight)
    reference = sipo.diffusion_dpo_loss(e_w, e_l, r_w, r_l, beta=50.0)[0]
    loss = loss_fn(e_w, e_l, r_w, r_l, log_w_w, log_w_l, beta=50.0, tau=0.0, eps=0.0, normalise=normalise)[0]
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_dpo_cm_hand_values():
    e_w, e_l = torch.tensor([0.10, 0.30, 0.20]), torch.tensor([0.20, 0.10, 0.25])
    r_w, r_l = torch.tensor([0.15, 0.20, 0.20]), torch.tensor([0.25, 0.10, 0.20])
    w_w, w_l = [1.0, 0.5, 0.95], [0.9, 0.95, 1.0]
    log_w_w, log_w_l = torch.tensor(w_w).log(), torch.tensor(w_l).log()
    loss, stats = sipo.dpo_cm_loss(e_w, e_l, r_w, r_l, log_w_w, log_w_l, beta=10.0, tau=0.9, eps=0.02)
    # pair 1 masked (0.5 < 0.9); pi = (0.9, 0.95), mean 0.925 -> ratios (0.973, 1.027) -> clipped (0.98, 1.02)
    z = [-5 * ((0.10 - 0.15) - (0.20 - 0.25)), -5 * ((0.20 - 0.20) - (0.25 - 0.20))]
    expected = (0.98 * neg_logsigmoid(z[0]) + 1.02 * neg_logsigmoid(z[1])) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["mask_fraction"].item() == pytest.approx(1 / 3)
    assert stats["weight_min"].item() == pytest.approx(0.5)
    assert stats["clip_fraction_pair"].item() == 1.0


def test_sipo_hand_values_and_gradient():
    e_w = torch.tensor([0.10, 0.30, 0.20], requires_grad=True)
    e_l = torch.tensor([0.20, 0.10, 0.25], requires_grad=True)
    r_w, r_l = torch.tensor([0.15, 0.20, 0.20]), torch.tensor([0.25, 0.10, 0.20])
    w_w, w_l = [1.0, 0.5, 0.95], [0.9, 0.95, 1.0]
    loss, stats = sipo.sipo_loss(e_w, e_l, r_w, r_l, torch.tensor(w_w).log(), torch.tensor(w_l).log(), beta=10.0,
                                 tau=0.9, eps=0.05)
    mean = (1.0 + 0.9 + 0.95 + 1.0) / 4  # unmasked branches only
    clip = lambda w: min(max(w / mean, 0.95), 1.05)  # noqa: E731
    hat_w, hat_l = [clip(1.0), None, clip(0.95)], [clip(0.9), None, clip(1.0)]
    assert hat_l[0] == 0.95 and hat_w[0] == pytest.approx(1 / mean)
    delta_w, delta_l = [-0.05, None, 0.0], [-0.05, None, 0.05]
    z = {i: -5 * (hat_w[i] * delta_w[i] - hat_l[i] * delta_l[i]) for i in (0, 2)}
    expected = (neg_logsigmoid(z[0]) + neg_logsigmoid(z[2])) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["clip_fraction_branch"].item() == pytest.approx(1 / 4), "only 0.9 / mean = 0.935 is clipped"
    loss.backward()
    assert e_w.grad[1].item() == 0.0 and e_l.grad[1].item() == 0.0, "masked pair carries no gradient"
    for i in (0, 2):
        assert e_w.grad[i].item() == pytest.approx(5 * hat_w[i] * sigmoid(-z[i]) / 2, rel=1e-5)
        assert e_l.grad[i].item() == pytest.approx(-5 * hat_l[i] * sigmoid(-z[i]) / 2, rel=1e-5)


def test_before_mask_hand_values():
    """docs/method.md §8: normalise over every branch first (0.5 counts in the mean), mask relative weights below tau,
    clip the rest; DPO-C&M's pair ratio is rho_w rho_l."""
    e_w, e_l = torch.tensor([0.10, 0.30, 0.20]), torch.tensor([0.20, 0.10, 0.25])
    r_w, r_l = torch.tensor([0.15, 0.20, 0.20]), torch.tensor([0.25, 0.10, 0.20])
    w_w, w_l = [1.0, 0.5, 0.95], [0.9, 0.95, 1.0]
    mean = (1.0 + 0.5 + 0.95 + 0.9 + 0.95 + 1.0) / 6  # 0.8833: rho = 1.132, 0.566, 1.075 | 1.019, 1.075, 1.132
    clip = lambda rho: min(max(rho, 0.9), 1.1)  # noqa: E731
    delta_w, delta_l = [-0.05, None, 0.0], [-0.05, None, 0.05]
    log_w_w, log_w_l = torch.tensor(w_w).log(), torch.tensor(w_l).log()
    loss, stats = sipo.sipo_loss(e_w, e_l, r_w, r_l, log_w_w, log_w_l, beta=10.0, tau=0.9, eps=0.1,
                                 normalise="before-mask")
    z = {i: -5 * (clip(w_w[i] / mean) * delta_w[i] - clip(w_l[i] / mean) * delta_l[i]) for i in (0, 2)}
    assert loss.item() == pytest.approx((neg_logsigmoid(z[0]) + neg_logsigmoid(z[2])) / 2, rel=1e-5)
    assert stats["mask_fraction"].item() == pytest.approx(1 / 3)
    assert stats["clip_fraction_branch"].item() == pytest.approx(2 / 4), "1.132 twice; 1.019 and 1.075 not"
    loss, _ = sipo.dpo_cm_loss(e_w, e_l, r_w, r_l, log_w_w, log_w_l, beta=10.0, tau=0.9, eps=0.1,
                               normalise="before-mask")
    z = [-5 * ((0.10 - 0.15) - (0.20 - 0.25)), -5 * ((0.20 - 0.20) - (0.25 - 0.20))]
    pair = [clip(w_w[0] * w_l[0] / mean ** 2), clip(w_w[2] * w_l[2] / mean ** 2)]
    assert loss.item() == pytest.approx((pair[0] * neg_logsigmoid(z[0]) + pair[1] * neg_logsigmoid(z[1])) / 2,
                                        rel=1e-5)


@pytest.mark.parametrize("loss_fn", LOSS_FNS)
def test_mask_removes_exactly_the_pairs_below_tau(loss_fn):
    e_w, e_l, r_w, r_l, _, _ = random_batch(pairs=6)
    w_w = torch.tensor([0.95, 0.89, 0.99, 0.90, 1.00, 0.0])
    w_l = torch.tensor([0.97, 0.99, 0.80, 0.91, 0.90, 1.0])
    keep = torch.tensor([True, False, False, True, True, False])
    full = loss_fn(e_w, e_l, r_w, r_l, w_w.log(), w_l.log(), beta=30.0, tau=0.9, eps=0.2)
    kept = loss_fn(e_w[keep], e_l[keep], r_w[keep], r_l[keep], w_w[keep].log(), w_l[keep].log(), beta=30.0,
                   tau=0.0, eps=0.2)
    assert full[1]["mask_fraction"].item() == pytest.approx(0.5)
    assert full[0].item() == pytest.approx(kept[0].item(), rel=1e-6)


@pytest.mark.parametrize("weight,normalise", READINGS)
@pytest.mark.parametrize("loss_fn", LOSS_FNS)
def test_weights_carry_no_gradient(loss_fn, weight, normalise):
    """Weights computed from the policy's own error: the gradient must equal that with detached weights."""
    abar = sd_alphas_cumprod()
    t = torch.tensor([100, 300, 500, 700])
    coef_t, coef_s = sipo.ddpm_coefficients(abar, t), sipo.ddpm_coefficients(abar, t - 20)
    scale, snr_t, snr_s = sipo.x0_error_scale(*coef_t, "epsilon"), sipo.snr(*coef_t), sipo.snr(*coef_s)
    e_w, e_l, r_w, r_l, _, _ = random_batch(pairs=4)
    grads = []
    for detach in (False, True):
        ew, el = e_w.clone().requires_grad_(), e_l.clone().requires_grad_()
        log_w_w = sipo.importance_log_weight((ew.detach() if detach else ew) * scale, snr_t, snr_s)
        log_w_l = sipo.importance_log_weight((el.detach() if detach else el) * scale, snr_t, snr_s)
        log_w_w, log_w_l = reading_log_weights(log_w_w, log_w_l, weight)
        assert not log_w_w.requires_grad
        loss_fn(ew, el, r_w, r_l, log_w_w, log_w_l, beta=20.0, tau=0.5, eps=0.3, normalise=normalise)[0].backward()
        grads.append((ew.grad, el.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("weight,normalise", READINGS)
@pytest.mark.parametrize("loss_fn", LOSS_FNS)
def test_fully_masked_batch_gives_zero_loss_and_zero_gradient(loss_fn, weight, normalise):
    e_w, e_l, r_w, r_l, _, _ = random_batch(pairs=4)
    e_w.requires_grad_()
    # each pair has one branch of weight 0 (a final step): masked under either normalisation
    log_w_w = torch.tensor([0.0, -math.inf, -0.1, -math.inf])
    log_w_l = torch.tensor([-math.inf, -0.2, -math.inf, 0.0])
    log_w_w, log_w_l = reading_log_weights(log_w_w, log_w_l, weight)
    tau = 0.9
    loss, stats = loss_fn(e_w, e_l, r_w, r_l, log_w_w, log_w_l, beta=20.0, tau=tau, eps=0.1, normalise=normalise)
    loss.backward()
    assert loss.item() == 0.0 and stats["mask_fraction"].item() == 1.0
    assert torch.equal(e_w.grad, torch.zeros(4))
    assert all(math.isfinite(v.item()) for v in stats.values())
    # the same with global statistics of an all-masked global batch, and with every weight 0 (0 / 0: no NaN)
    for w_w, w_l in ((log_w_w, log_w_l), (torch.full((4,), -math.inf),) * 2):
        shards = [slice(0, 1), slice(1, 4)]
        losses = on_ranks(lambda i, all_reduce: loss_fn(e_w[i], e_l[i], r_w[i], r_l[i], w_w[i], w_l[i], 20.0,
                                                        tau, 0.1, normalise, all_reduce), shards)
        assert all(loss.item() == 0.0 and all(math.isfinite(v.item()) for v in stats.values())
                   for loss, stats in losses)


@pytest.mark.parametrize("weight,normalise", READINGS)
@pytest.mark.parametrize("loss_fn", LOSS_FNS)
def test_global_statistics_split_across_ranks_reproduce_the_full_batch(loss_fn, weight, normalise):
    e_w, e_l, r_w, r_l, log_w_w, log_w_l = random_batch(pairs=12)
    log_w_w, log_w_l = reading_log_weights(log_w_w, log_w_l, weight)
    tau = 0.8 if weight == "step" or normalise == "before-mask" else 0.6
    e_w.requires_grad_()
    full = loss_fn(e_w, e_l, r_w, r_l, log_w_w, log_w_l, beta=40.0, tau=tau, eps=0.05, normalise=normalise)[0]
    assert 0 < full.item()
    full_grad, = torch.autograd.grad(full, e_w)
    shards = [slice(0, 5), slice(5, 12)]  # uneven local batches

    def rank_loss(i, all_reduce):
        return loss_fn(e_w[i], e_l[i], r_w[i], r_l[i], log_w_w[i], log_w_l[i], 40.0, tau, 0.05, normalise,
                       all_reduce)[0]

    parts = on_ranks(rank_loss, shards)
    assert sum(parts).item() == pytest.approx(full.item(), rel=1e-6)
    grads = [torch.autograd.grad(part, e_w)[0] for part in parts]
    torch.testing.assert_close(sum(grads), full_grad, rtol=1e-6, atol=1e-9)
    local = rank_loss(shards[0], None)
    assert local.item() != pytest.approx(parts[0].item(), rel=1e-6), "local statistics must differ here"


# --- The path weight (docs/method.md §8) ----------------------------------------------------------------------------

def test_later_steps_are_the_grid_above_t_uniformly():
    t = torch.tensor([0, 900, 979, 980, 999])
    n_later, later = sipo.later_steps(t, 20, 999, draws=20_000, generator=torch.Generator().manual_seed(0))
    assert n_later.tolist() == [49, 4, 1, 0, 0] and later.dtype == torch.long
    for i, n in enumerate(n_later.tolist()):
        offsets = (later[:, i] - t[i]) / 20
        if n:
            assert set(offsets.tolist()) == set(range(1, n + 1)), "every later grid step, and only those"
            counts = torch.bincount(offsets.long())[1:].float()
            assert (counts / counts.sum() - 1 / n).abs().max() < 0.02, "uniform"
    assert (later <= 999).all()
    sigma = torch.tensor([0.9, 0.5, 0.99])
    n_later, later = sipo.later_steps(sigma, 0.02, 1.0, draws=5000, generator=torch.Generator().manual_seed(1))
    assert n_later.tolist() == [5, 25, 0] and (later[:, :2] <= 1.0 + 1e-6).all()
    assert torch.allclose(later[:, 0].max(), torch.tensor(1.0)) and torch.allclose(later[:, 0].min(),
                                                                                      torch.tensor(0.92))


def test_path_estimator_is_unbiased():
    """The mean of (n / K) sum_j l(k_j) over many draws equals the full sum of l over the later steps."""
    t = torch.tensor([100, 500, 940, 999])
    table = -((torch.arange(1000, dtype=torch.float64) / 1000) ** 2) - 0.01  # l(k), any fixed function of k
    n_later, later = sipo.later_steps(t, 20, 999, draws=2, generator=torch.Generator().manual_seed(3))
    estimates = []
    for seed in range(4000):
        n_later, later = sipo.later_steps(t, 20, 999, draws=2, generator=torch.Generator().manual_seed(seed))
        estimates.append(sipo.path_log_weight(table[t].float(), table[later].float(), n_later))
    estimates = torch.stack(estimates).double()
    exact = torch.stack([table[range(k, 1000, 20)].sum() for k in t.tolist()])
    stderr = estimates.std(0) / math.sqrt(len(estimates))
    assert ((estimates.mean(0) - exact).abs() <= 4 * stderr + 1e-5).all()
    assert estimates[:, -1].eq(table[999].float()).all(), "no later step at the top: the step term alone"


def analytic_x0_hat(x, a, s):
    """A small analytic 'model': the posterior mean of x0 under the prior N(0, I), a reasonable but imperfect
    denoiser for a fixed x0."""
    return a * x / (a ** 2 + s ** 2)


PATH_CASES = [("epsilon", 900, 20, 999), ("epsilon", 400, 20, 999), ("v", 900, 20, 999), ("flow", 0.9, 0.02, 1.0),
              ("flow", 0.5, 0.1, 1.0)]


@pytest.mark.parametrize("prediction,t,stride,top", PATH_CASES)
def test_path_weight_matches_explicit_gaussian_densities_along_trajectories(prediction, t, stride, top):
    """E log W_t against the explicit product of Gaussian transition densities along trajectories of the
    reverse posterior: x_top ~ q(x_top | x0), then x_{k - stride} ~ q(. | x_k, x0) down to t - stride, summing
    log p(x_{k-stride} | x_k) - log q(x_{k-stride} | x_k, x0) with p = q(. | x_k, x0_hat(x_k))."""
    torch.manual_seed(4)
    dim, trajectories = 8, 40_000
    if prediction == "flow":
        def coef(level):
            level = torch.as_tensor(level, dtype=torch.float64)
            return 1 - level, level
    else:
        abar = sd_alphas_cumprod() if prediction == "epsilon" else zero_snr_alphas_cumprod()

        def coef(level):
            return abar[level].sqrt(), (1 - abar[level]).sqrt()
    x0 = torch.randn(dim, dtype=torch.float64)
    n = int((top - t) / stride + 1e-6)
    grid = [t + m * stride for m in range(n + 1)]
    if prediction != "flow":
        grid = [int(k) for k in grid]

    # explicit densities along sampled trajectories
    a, s = coef(grid[-1])
    x = a * x0 + s * torch.randn(trajectories, dim, dtype=torch.float64)
    log_ratio = torch.zeros(trajectories, dtype=torch.float64)
    for k in reversed(grid):
        (a_t, s_t), (a_s, s_s) = coef(k), coef(k - stride)
        alpha_ts = a_t / a_s
        var_ts = s_t ** 2 - alpha_ts ** 2 * s_s ** 2
        std = (var_ts * s_s ** 2 / s_t ** 2).sqrt()

        def mean(x0_):
            return alpha_ts * s_s ** 2 / s_t ** 2 * x + a_s * var_ts / s_t ** 2 * x0_

        q, p = torch.distributions.Normal(mean(x0), std), torch.distributions.Normal(mean(analytic_x0_hat(x, a_t, s_t)),
                                                                                   std)
        x_s = q.sample()
        log_ratio += (p.log_prob(x_s) - q.log_prob(x_s)).sum(-1) / dim
        x = x_s
    expected, expected_err = log_ratio.mean().item(), log_ratio.std().item() / math.sqrt(trajectories)

    # sipo.py's estimate: the step term at t plus K = 2 uniform later draws, each at a fresh x_k ~ q(x_k | x0)
    def step_term(levels):
        a_k, s_k = coef(levels)
        (a_k, s_k), (a_p, s_p) = (a_k[:, None], s_k[:, None]), [c[:, None] for c in coef(levels - stride)]
        noise = torch.randn(len(levels), dim, dtype=torch.float64)
        x_k = a_k * x0 + s_k * noise
        pred = prediction_for(analytic_x0_hat(x_k, a_k, s_k), x_k, a_k, s_k, prediction)
        target = sipo.native_target(x0.expand(len(levels), -1), noise, a_k[:, 0], s_k[:, 0], prediction)
        scale = sipo.x0_error_scale(a_k[:, 0].float(), s_k[:, 0].float(), prediction)
        return sipo.importance_log_weight(sipo.per_sample_error(pred, target) * scale,
                                          sipo.snr(a_k[:, 0].float(), s_k[:, 0].float()),
                                          sipo.snr(a_p[:, 0].float(), s_p[:, 0].float()))

    levels = torch.full((trajectories,), t, dtype=torch.float64 if prediction == "flow" else torch.long)
    n_later, later = sipo.later_steps(levels, stride, top, draws=2)
    later_terms = torch.stack([step_term(k) for k in later])
    estimate = sipo.path_log_weight(step_term(levels), later_terms, n_later).double()
    got, got_err = estimate.mean().item(), estimate.std().item() / math.sqrt(trajectories)
    assert n_later[0].item() == n and expected < -1e-3, "a case where the weight is not trivially 1"
    assert got == pytest.approx(expected, abs=4 * math.hypot(expected_err, got_err) + 2e-4)


def test_no_nan_for_bf16_inputs_and_final_steps():
    e_w, e_l, r_w, r_l, log_w_w, log_w_l = (x.bfloat16() for x in random_batch())
    for loss_fn in (sipo.dpo_cm_loss, sipo.sipo_loss):
        for tau in (0.0, 0.9):
            loss, stats = loss_fn(e_w, e_l, r_w, r_l, log_w_w, log_w_l, beta=5000.0, tau=tau, eps=0.1)
            assert loss.dtype == torch.float32 and math.isfinite(loss.item())
            assert all(math.isfinite(v.item()) for v in stats.values())
    loss, _ = sipo.diffusion_dpo_loss(e_w, e_l, r_w, r_l, beta=5000.0)
    assert math.isfinite(loss.item())
    assert sipo.sft_loss(e_w)[0].item() == pytest.approx(e_w.float().mean().item())


def test_unknown_names_fail_clearly():
    with pytest.raises(ValueError, match="unknown prediction type 'sample'"):
        sipo.native_target(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1), "sample")
    with pytest.raises(ValueError, match="unknown normalisation 'before'"):
        sipo.sipo_loss(*torch.zeros(6, 2), beta=1.0, normalise="before")


def test_sipo_py_runs_alone_in_an_empty_directory(tmp_path):
    shutil.copy(Path(__file__).with_name("sipo.py"), tmp_path / "sipo.py")
    script = ("import torch, sipo\n"
              "e = torch.rand(4, 4).unbind()\n"
              "lw = torch.full((4,), -0.01)\n"
              "print(sipo.sipo_loss(*e, lw, lw, beta=100.0)[0].item())\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(tmp_path), "PATH": ""})
    assert result.returncode == 0, result.stderr
    assert math.isfinite(float(result.stdout))


@pytest.mark.parametrize("prediction_type,family", [("epsilon", "epsilon"), ("v_prediction", "v"), ("flow", "flow")])
def test_drop_in_objective_assembles_the_documented_pieces(prediction_type, family):
    """preference_objective = the weights of docs/method.md §3 at stride T / 50 fed to sipo_loss, for diffusers' names;
    with an all_reduce its loss is scaled for gradient-averaging wrappers: the ranks' mean is the full loss."""
    g = torch.Generator().manual_seed(7)
    model_error, ref_error = torch.rand(16, generator=g) * 0.3, torch.rand(16, generator=g) * 0.3
    if family == "flow":
        levels = torch.rand(8, generator=g)
        coef, coef_s, schedule = sipo.flow_coefficients(levels), sipo.flow_coefficients(levels - 0.02), None
    else:
        schedule = sd_alphas_cumprod() if family == "epsilon" else zero_snr_alphas_cumprod()
        levels = torch.randint(0, 1000, (8,), generator=g)
        coef, coef_s = sipo.ddpm_coefficients(schedule, levels), sipo.ddpm_coefficients(schedule, levels - 20)
    log_w = sipo.importance_log_weight(model_error * sipo.x0_error_scale(*[c.repeat(2) for c in coef], family),
                                       sipo.snr(*coef).repeat(2), sipo.snr(*coef_s).repeat(2))
    expected = sipo.sipo_loss(*model_error.chunk(2), *ref_error.chunk(2), *log_w.chunk(2), beta=500.0, tau=0.6)[0]
    got = sipo.preference_objective(model_error, ref_error, levels, 500.0, "sipo", schedule, prediction_type,
                                    tau=0.6)[0]
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    halves = [torch.arange(0, 3), torch.arange(3, 8)]
    parts = on_ranks(lambda i, all_reduce: sipo.preference_objective(
        torch.cat([model_error[i], model_error[8 + i]]), torch.cat([ref_error[i], ref_error[8 + i]]), levels[i],
        500.0, "sipo", schedule, prediction_type, tau=0.6, all_reduce=all_reduce)[0], halves)
    assert (sum(parts) / 2).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="unknown prediction type 'sample'"):
        sipo.preference_objective(model_error, ref_error, levels, 500.0, "sipo", schedule, "sample")
