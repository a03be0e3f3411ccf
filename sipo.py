"""SIPO, DPO-C&M and Diffusion-DPO for diffusion models, as pure functions on tensors.

Imports torch only: copy this file into any trainer. Every formula names its source:
  [paper]    SIPO, arXiv 2505.21893
  [baseline] Diffusion-DPO, Wallace et al., arXiv 2311.12908
  [ours]     this project's reconstruction of what the paper leaves open
Sections (§N) are those of docs/method.md in the repository this file comes from, which derives each formula.

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
# Noising (§1)
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
# The step importance weight (§3)
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


def later_steps(level, stride, top, draws, generator=None):
    """The path weight's sampler steps after t [ours, §8]: n_later, how many grid steps t + j stride
    (j >= 1) lie at or below `top` (T - 1 for DDPM, sigma = 1 for flow), and `draws` of them per sample, uniform
    over those steps: (n_later (B,), later levels (draws, B)). Where n_later = 0 any level <= top is returned; its
    term gets coefficient 0 in path_log_weight. Integer levels (DDPM timesteps) stay integers."""
    n_later = torch.floor((top - level) / stride + 1e-6).long().clamp_min(0)
    u = torch.rand((draws, *level.shape), generator=generator, device=level.device)
    j = 1 + (u * n_later).long().clamp_max(n_later - 1).clamp_min(0)
    later = level + j * stride
    return n_later, later.clamp_max(top) if level.is_floating_point() else later.clamp_max(int(top))


def path_log_weight(step_log_w, later_log_w, n_later):
    """log W_t = log w_t + (n_later / K) sum_j log w_{k_j}: the per-decision importance weight of the step at t,
    the product of the ratios of every sampler step from pure noise down to t [ours, §8]. The sum over
    the n_later steps above t is estimated without bias from K uniform draws (later_steps), each a no-grad policy
    forward at a fresh x_k ~ q(x_k | x0) whose importance_log_weight is later_log_w (K, B)."""
    later = later_log_w.detach().float()
    return step_log_w.detach().float() + n_later.float() / later.shape[0] * later.sum(0)


WEIGHTS = ("step", "path")
NORMALISATIONS = ("after-mask", "before-mask")


def _sum_over_ranks(tensor, all_reduce):
    return tensor if all_reduce is None else all_reduce(tensor)


def _ratio(weight, mean):
    """weight / mean, and 0 where the mean is 0 (every weight 0: nothing is informative)."""
    return torch.where(mean > 0, weight / mean.clamp_min(1e-30), torch.zeros_like(weight))


def clip_and_mask(log_w_w, log_w_l, tau, eps, normalise="after-mask", all_reduce=None):
    """The mask m and the clipped, self-normalised weights of each branch and of each pair (§4-5, §8).

    [paper] mask timesteps whose weight is below tau; clip the importance weight to [1 - eps, 1 + eps].
    [ours]  "after-mask" (§4-5): m = 1[min(w_w, w_l) >= tau]; then each weight over its mean on the
            unmasked entries: branches w / mean(w) for SIPO, pairs w_w w_l / mean(w_w w_l) for DPO-C&M.
            "before-mask" (§8): rho = w / mean(w) over every branch first; m = 1[min(rho_w, rho_l) >= tau];
            branch ratios rho, pair ratios rho_w rho_l.
    Every ratio is clipped to [1 - eps, 1 + eps] and set to 1 where masked. Means and the unmasked count are taken
    over the global batch: pass all_reduce, a function returning the sum of a tensor over ranks (None: this
    batch is the global one). Returns mask, clipped branch ratios (w, l), clipped pair ratio, unmasked count and
    statistics; nothing carries gradient."""
    if normalise not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {normalise!r}; expected one of {NORMALISATIONS}")
    w_w, w_l = log_w_w.detach().float().exp(), log_w_l.detach().float().exp()
    if normalise == "before-mask":
        sums = _sum_over_ranks(torch.stack([(w_w + w_l).sum(), w_w.new_tensor(2.0 * len(w_w))]), all_reduce)
        rho_w, rho_l = _ratio(w_w, sums[0] / sums[1]), _ratio(w_l, sums[0] / sums[1])
        mask = torch.minimum(rho_w, rho_l) >= tau
        count = _sum_over_ranks(mask.float().sum(), all_reduce)
        pair = rho_w * rho_l
    else:
        mask = torch.minimum(w_w, w_l) >= tau
        m = mask.float()
        sums = _sum_over_ranks(torch.stack([m.sum(), (m * (w_w + w_l)).sum(), (m * w_w * w_l).sum()]), all_reduce)
        count = sums[0]
        rho_w, rho_l = _ratio(w_w, sums[1] / (2 * count)), _ratio(w_l, sums[1] / (2 * count))
        pair = _ratio(w_w * w_l, sums[2] / count)

    def clip(ratio):
        return torch.where(mask, ratio.clamp(1 - eps, 1 + eps), torch.ones_like(ratio))

    def clipped_fraction(*ratios):
        binds = sum(((r < 1 - eps) | (r > 1 + eps)).float() * mask for r in ratios)
        return binds.sum() / (len(ratios) * mask.float().sum()).clamp_min(1)

    w = torch.cat([w_w, w_l])
    stats = {"mask_fraction": 1 - mask.float().mean(), "weight_mean": w.mean(), "weight_min": w.min(),
             "weight_max": w.max(), "clip_fraction_branch": clipped_fraction(rho_w, rho_l),
             "clip_fraction_pair": clipped_fraction(pair)}
    return mask, clip(rho_w), clip(rho_l), clip(pair), count, stats


# ---------------------------------------------------------------------------------------------------
# Losses (§2, §4, §5, §6). Each returns (scalar loss, dict of detached 0-dim statistics).
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


def diffusion_dpo_loss(e_w, e_l, r_w, r_l, beta):
    """L = mean -log sigmoid(-(beta / 2) ((e_w - r_w) - (e_l - r_l))) [baseline, Wallace et al. eq. 14]."""
    inside = _dpo_margin(e_w, e_l, r_w, r_l, beta)
    return -F.logsigmoid(inside).mean(), _stats(e_w, e_l, r_w, r_l, inside)


def dpo_cm_loss(e_w, e_l, r_w, r_l, log_w_w, log_w_l, beta, tau=0.9, eps=0.1, normalise="after-mask",
                all_reduce=None):
    """DPO-C&M: L = sum_i m_i sg(c_i) (-log sigmoid(z_i)) / max(1, sum_i m_i), z as in diffusion_dpo_loss.

    [paper] mask timesteps whose weight is below tau, clip the importance weight to [1 - eps, 1 + eps].
    [ours] c_i is the pair's clipped ratio and m its mask from clip_and_mask (see there for `normalise`); the
    normaliser counts unmasked pairs of the global batch (all_reduce: the sum over ranks, None for one process).
    """
    mask, _, _, clipped, count, weight_stats = clip_and_mask(log_w_w, log_w_l, tau, eps, normalise, all_reduce)
    inside = _dpo_margin(e_w, e_l, r_w, r_l, beta)
    loss = (mask * clipped * -F.logsigmoid(inside)).sum() / count.clamp_min(1)
    return loss, _stats(e_w, e_l, r_w, r_l, inside, **weight_stats,
                        clip_mean=(mask * clipped).sum() / mask.sum().clamp_min(1))


def sipo_loss(e_w, e_l, r_w, r_l, log_w_w, log_w_l, beta, tau=0.9, eps=0.1, normalise="after-mask",
              all_reduce=None):
    """SIPO: L = sum_i m_i (-log sigmoid(-(beta/2)(w_hat_w Delta_w - w_hat_l Delta_l))) / max(1, sum_i m_i).

    [paper] clipped, timestep-aware importance weights re-weight the log-likelihood-ratio terms.
    [ours] Delta_b = e_b - r_b; w_hat_b the branch's clipped ratio and m the mask from clip_and_mask (see there for
    `normalise`); the normaliser counts unmasked pairs of the global batch. Equals diffusion_dpo_loss when
    tau = eps = 0, for either normalisation and either weight.
    """
    mask, w_hat_w, w_hat_l, _, count, weight_stats = clip_and_mask(log_w_w, log_w_l, tau, eps, normalise,
                                                                    all_reduce)
    inside = _dpo_margin(e_w, e_l, r_w, r_l, beta, w_hat_w, w_hat_l)
    loss = (mask * -F.logsigmoid(inside)).sum() / count.clamp_min(1)
    dpo_margin = _dpo_margin(e_w, e_l, r_w, r_l, beta)
    return loss, _stats(e_w, e_l, r_w, r_l, dpo_margin, **weight_stats,
                        sipo_margin=(mask * inside).sum() / mask.sum().clamp_min(1))


def sft_loss(e_w):
    """L = mean(e_w): the plain denoising loss on preferred samples [baseline]."""
    loss = e_w.float().mean()
    return loss, {"err_policy_w": loss.detach()}


# ---------------------------------------------------------------------------------------------------------------
# The drop-in: the whole objective in one call, for a trainer that already has per-sample errors
# ---------------------------------------------------------------------------------------------------------------

# diffusers' names (scheduler.config.prediction_type) and this file's
PREDICTION_NAMES = {"epsilon": "epsilon", "v_prediction": "v", "v": "v", "flow": "flow", "flow_prediction": "flow"}


def preference_objective(model_error, ref_error, timesteps, beta, loss="sipo", alphas_cumprod=None,
                         prediction_type="epsilon", tau=0.9, eps=0.1, normalise="after-mask", sample_steps=50,
                         temperature=1.0, all_reduce=None):
    """Diffusion-DPO, DPO-C&M or SIPO from per-sample errors, as a diffusers-style loop has them [§2-5].

    model_error, ref_error: (2B,) mean squared errors against the scheduler's target, winners first (the
      torch.cat([winners, losers]) layout of diffusers' DPO example, whose `model_losses` these are);
    timesteps: (2B,) or (B,) integer DDPM timesteps with `alphas_cumprod` (scheduler.alphas_cumprod), or, with
      alphas_cumprod None, flow sigmas in [0, 1];
    beta: §2's convention, z = -(beta / 2) ((e_w - r_w) - (e_l - r_l)), as the original Diffusion-DPO code's
      beta_dpo; diffusers' example has no 1/2 (-logsigmoid(beta_dpo (ref_diff - model_diff))): pass 2 * beta_dpo;
    prediction_type: scheduler.config.prediction_type ("epsilon", "v_prediction") or "flow";
    all_reduce: a function returning a tensor's sum over ranks (None: one process). With it the loss is scaled by
      the number of ranks, for wrappers that average gradients over ranks (DDP, FSDP, accelerate).
    The step weight (§3) uses the stride T / sample_steps; the path weight needs extra policy forwards and is
    train.py's (later_steps, path_log_weight). Returns (loss, statistics)."""
    if prediction_type not in PREDICTION_NAMES:
        raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {tuple(PREDICTION_NAMES)}")
    e_w, e_l = model_error.chunk(2)
    r_w, r_l = ref_error.chunk(2)
    if loss == "dpo":
        return diffusion_dpo_loss(e_w, e_l, r_w, r_l, beta)
    if loss not in ("dpo-cm", "sipo"):
        raise ValueError(f"unknown loss {loss!r}; expected 'dpo', 'dpo-cm' or 'sipo'")
    timesteps = timesteps.repeat(2) if len(timesteps) * 2 == len(model_error) else timesteps
    if alphas_cumprod is not None:
        stride = len(alphas_cumprod) // sample_steps
        (a, s), (a_s, s_s) = (ddpm_coefficients(alphas_cumprod, timesteps.long() - k) for k in (0, stride))
    else:
        (a, s), (a_s, s_s) = (flow_coefficients(timesteps - k) for k in (0, 1.0 / sample_steps))
    x0_error = model_error * x0_error_scale(a, s, PREDICTION_NAMES[prediction_type])
    log_w_w, log_w_l = importance_log_weight(x0_error, snr(a, s), snr(a_s, s_s), temperature).chunk(2)
    loss_fn = sipo_loss if loss == "sipo" else dpo_cm_loss
    value, stats = loss_fn(e_w, e_l, r_w, r_l, log_w_w, log_w_l, beta, tau, eps, normalise, all_reduce)
    ranks = 1 if all_reduce is None else all_reduce(torch.ones((), device=value.device))
    return value * ranks, stats

