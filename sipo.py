"""SIPO, DPO-C&M and Diffusion-DPO for diffusion models, as pure functions on tensors.

Imports torch only: copy this file into any trainer. Every formula names its source:
  [paper]    SIPO, arXiv 2505.21893
  [baseline] Diffusion-DPO, Wallace et al., arXiv 2311.12908
  [ours]     this project's reconstruction of what the paper leaves open (README: "what is whose")

A Gaussian path is x_t = a_t x0 + s_t eps, SNR(t) = a_t^2 / s_t^2. Three parameterisations:
  "epsilon"  DDPM, network predicts eps                   (SD1.5, SDXL)
  "v"        DDPM, network predicts v = a eps - s x0      (CogVideoX)
  "flow"     rectified flow, a = 1 - sigma, s = sigma,    (Wan2.1)
             network predicts u = eps - x0
Per-sample tensors are 1-D over the batch; winner and loser are two tensors of the same shape.
"""
import math

import torch
import torch.nn.functional as F

PREDICTIONS = ("epsilon", "v", "flow")


# ---------------------------------------------------------------------------------------------------
# Noising (METHOD §1)
# ---------------------------------------------------------------------------------------------------

def ddpm_coefficients(alphas_cumprod, t):
    """(a_t, s_t) = (sqrt(abar_t), sqrt(1 - abar_t)) [baseline]; t < 0 is the clean sample: (1, 0)."""
    abar = alphas_cumprod.to(device=t.device, dtype=torch.float64)[t.clamp_min(0)]
    abar = torch.where(t < 0, torch.ones_like(abar), abar)
    return abar.sqrt().float(), (1 - abar).clamp_min(0).sqrt().float()


def flow_coefficients(sigma):
    """(a, s) = (1 - sigma, sigma) for rectified flow [baseline]; sigma <= 0 is the clean sample: (1, 0)."""
    sigma = sigma.float().clamp(0, 1)
    return 1 - sigma, sigma


def shift_sigma(sigma, shift):
    """Wan's timestep shift sigma' = k sigma / (1 + (k - 1) sigma) [ours: common Wan fine-tuning practice]."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def snr(a, s):
    """SNR(t) = a_t^2 / s_t^2 [baseline]; +inf for the clean sample (s = 0), 0 at zero terminal SNR (a = 0)."""
    return torch.where(s > 0, a.square() / s.square().clamp_min(1e-30), torch.full_like(a, math.inf))


def _per_sample(coef, like):
    return coef.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def add_noise(x0, noise, a, s):
    """x_t = a_t x0 + s_t eps, with per-sample a, s [baseline]."""
    return _per_sample(a, x0) * x0 + _per_sample(s, x0) * noise


def native_target(x0, noise, a, s, prediction):
    """What the network regresses: eps (epsilon), a eps - s x0 (v), eps - x0 (flow) [baseline]."""
    if prediction == "epsilon":
        return noise
    if prediction == "v":
        return _per_sample(a, x0) * noise - _per_sample(s, x0) * x0
    if prediction == "flow":
        return noise - x0
    raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")


def x0_from_prediction(x_t, pred, a, s, prediction):
    """x0_hat: (x_t - s eps_hat)/a (epsilon), a x_t - s v_hat (v), x_t - sigma u_hat (flow) [baseline]."""
    if prediction == "epsilon":
        return (x_t - _per_sample(s, x_t) * pred) / _per_sample(a, x_t)
    if prediction == "v":
        return _per_sample(a, x_t) * x_t - _per_sample(s, x_t) * pred
    if prediction == "flow":
        return x_t - _per_sample(s, x_t) * pred
    raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")


def x0_error_scale(a, s, prediction):
    """g_t with mean((x0_hat - x0)^2) = g_t * native error: (s/a)^2 (epsilon), s^2 (v, flow) [ours, exact]."""
    if prediction == "epsilon":
        return (s / a).square()
    if prediction in ("v", "flow"):
        return s.square()
    raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")


def per_sample_error(pred, target):
    """e = mean over every non-batch dim of (pred - target)^2, in float32 [baseline]."""
    return (pred.float() - target.float()).square().flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------------
# The step importance weight (METHOD §3)
# ---------------------------------------------------------------------------------------------------

def importance_log_weight(x0_error, snr_t, snr_s, temperature=1.0):
    """log w = -(lambda / 2) (SNR(s) - SNR(t)) mean((x0_hat - x0)^2), detached, float32.

    [paper] w_t = p_theta(x_s | x_t) / q(x_s | x_t, x0). [ours] its expectation in closed form,
    E_q[log w] = -KL(q || p_theta) (Kingma et al. 2021), per element, with temperature lambda.
    s is the earlier step a sampler takes (t - T / n_sample_steps); where s is the clean sample
    (SNR(s) = inf: the final, decoder step) the weight is exactly 0 (log w = -inf).
    Get x0_error as per_sample_error(pred, target) * x0_error_scale(a_t, s_t, prediction).
    """
    x0_error = x0_error.detach().float()
    snr_t, snr_s = snr_t.float(), snr_s.float()
    finite = torch.isfinite(snr_s)
    gap = torch.where(finite, snr_s - snr_t, torch.zeros_like(snr_s))
    log_w = -0.5 * temperature * gap * x0_error
    return torch.where(finite, log_w, torch.full_like(log_w, -math.inf))


def masked_weight_sums(log_w_w, log_w_l, tau, loss):
    """Local sums behind the global statistics of METHOD §4-5 [ours]: tensor([unmasked pairs,
    sum of the weights that get self-normalised, how many]). All-reduce (sum) across ranks, then pass
    mean_weight = sums[1] / sums[2] and unmasked_count = sums[0] to dpo_cm_loss or sipo_loss."""
    w_w, w_l, mask = _weights_and_mask(log_w_w, log_w_l, tau)
    m = mask.float()
    if loss == "dpo-cm":
        return torch.stack([m.sum(), (m * w_w * w_l).sum(), m.sum()])
    if loss == "sipo":
        return torch.stack([m.sum(), (m * (w_w + w_l)).sum(), 2 * m.sum()])
    raise ValueError(f"masked_weight_sums: loss must be 'dpo-cm' or 'sipo', got {loss!r}")


def _weights_and_mask(log_w_w, log_w_l, tau):
    w_w, w_l = log_w_w.detach().float().exp(), log_w_l.detach().float().exp()
    return w_w, w_l, torch.minimum(w_w, w_l) >= tau


def _clipped_ratio(weight, mean_weight, mask, eps):
    """sg(clip(weight / mean, 1 - eps, 1 + eps)) on unmasked entries, 1 elsewhere (never NaN)."""
    mean_weight = torch.as_tensor(mean_weight, dtype=weight.dtype, device=weight.device)
    ratio = torch.where(mean_weight > 0, weight / mean_weight.clamp_min(1e-30), torch.ones_like(weight))
    return torch.where(mask, ratio.clamp(1 - eps, 1 + eps), torch.ones_like(weight))


# ---------------------------------------------------------------------------------------------------
# Losses (METHOD §2, §4, §5, §6). Each returns (scalar loss, dict of detached 0-dim statistics).
# ---------------------------------------------------------------------------------------------------

def _dpo_margin(e_w, e_l, r_w, r_l, beta, scale_w=1.0, scale_l=1.0):
    model_diff_w, model_diff_l = e_w.float() - r_w.float(), e_l.float() - r_l.float()
    return -0.5 * beta * (scale_w * model_diff_w - scale_l * model_diff_l)


def _stats(e_w, e_l, r_w, r_l, dpo_margin, **extra):
    stats = {
        "accuracy": (dpo_margin > 0).float().mean(),
        "margin": dpo_margin.mean(),
        "err_policy_w": e_w.float().mean(), "err_policy_l": e_l.float().mean(),
        "err_ref_w": r_w.float().mean(), "err_ref_l": r_l.float().mean(),
        **extra,
    }
    return {k: v.detach() for k, v in stats.items()}


def _weight_stats(w_w, w_l, mask):
    w = torch.cat([w_w, w_l])
    return {"mask_fraction": 1 - mask.float().mean(), "weight_mean": w.mean(), "weight_min": w.min(),
            "weight_max": w.max()}


def diffusion_dpo_loss(e_w, e_l, r_w, r_l, beta):
    """L = mean -log sigmoid(-(beta / 2) ((e_w - r_w) - (e_l - r_l))) [baseline, Wallace et al. eq. 14]."""
    inside = _dpo_margin(e_w, e_l, r_w, r_l, beta)
    return -F.logsigmoid(inside).mean(), _stats(e_w, e_l, r_w, r_l, inside)


def dpo_cm_loss(e_w, e_l, r_w, r_l, log_w_w, log_w_l, beta, tau=0.9, eps=0.1, mean_weight=None,
                unmasked_count=None):
    """DPO-C&M: L = sum_i m_i sg(c_i) (-log sigmoid(z_i)) / max(1, sum_i m_i).

    [paper] mask timesteps whose weight is below tau, clip the importance weight to [1 - eps, 1 + eps].
    [ours] m = 1[min(w_w, w_l) >= tau]; c = clip(w_w w_l / mean, 1 - eps, 1 + eps), the mean taken over
    unmasked pairs of the global batch (pass mean_weight and unmasked_count from masked_weight_sums
    all-reduced; without them the local batch is used).
    """
    w_w, w_l, mask = _weights_and_mask(log_w_w, log_w_l, tau)
    pair_weight = w_w * w_l
    m = mask.float()
    if mean_weight is None:
        mean_weight = (m * pair_weight).sum() / m.sum().clamp_min(1)
    if unmasked_count is None:
        unmasked_count = m.sum()
    clipped = _clipped_ratio(pair_weight, mean_weight, mask, eps)
    inside = _dpo_margin(e_w, e_l, r_w, r_l, beta)
    loss = (m * clipped * -F.logsigmoid(inside)).sum() / torch.as_tensor(unmasked_count).clamp_min(1)
    return loss, _stats(e_w, e_l, r_w, r_l, inside, **_weight_stats(w_w, w_l, mask),
                        clip_mean=(m * clipped).sum() / m.sum().clamp_min(1))


def sipo_loss(e_w, e_l, r_w, r_l, log_w_w, log_w_l, beta, tau=0.9, eps=0.1, mean_weight=None,
              unmasked_count=None):
    """SIPO: L = sum_i m_i (-log sigmoid(-(beta/2)(w_hat_w Delta_w - w_hat_l Delta_l))) / max(1, sum_i m_i).

    [paper] clipped, timestep-aware importance weights re-weight the log-likelihood-ratio terms.
    [ours] Delta_b = e_b - r_b; w_hat_b = sg(clip(w_b / mean, 1 - eps, 1 + eps)), the mean over unmasked
    branches of the global batch; m as in dpo_cm_loss. Equals diffusion_dpo_loss when tau = eps = 0.
    """
    w_w, w_l, mask = _weights_and_mask(log_w_w, log_w_l, tau)
    m = mask.float()
    if mean_weight is None:
        mean_weight = (m * (w_w + w_l)).sum() / (2 * m.sum()).clamp_min(1)
    if unmasked_count is None:
        unmasked_count = m.sum()
    w_hat_w = _clipped_ratio(w_w, mean_weight, mask, eps)
    w_hat_l = _clipped_ratio(w_l, mean_weight, mask, eps)
    inside = _dpo_margin(e_w, e_l, r_w, r_l, beta, w_hat_w, w_hat_l)
    loss = (m * -F.logsigmoid(inside)).sum() / torch.as_tensor(unmasked_count).clamp_min(1)
    dpo_margin = _dpo_margin(e_w, e_l, r_w, r_l, beta)
    return loss, _stats(e_w, e_l, r_w, r_l, dpo_margin, **_weight_stats(w_w, w_l, mask),
                        sipo_margin=(m * inside).sum() / m.sum().clamp_min(1))


def sft_loss(e_w):
    """L = mean(e_w): the plain denoising loss on preferred samples [baseline]."""
    loss = e_w.float().mean()
    return loss, {"err_policy_w": loss.detach()}
