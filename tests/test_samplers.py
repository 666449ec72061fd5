"""Specification of the samplers (DDIM, PLMS, DPM-Solver++) and of classifier-free guidance.

No UNet: `GaussianDataModel` has LatentDiffusion's sampler-facing attributes and an analytic eps.
Its data are x_0 ~ N(mu, data_std^2) elementwise, mu = mean of the conditioning, so E[eps | x_t] has a
closed form and so does the probability-flow ODE: the standardised deviation
(x - sqrt(a) mu) / sqrt(a data_std^2 + 1 - a) stays constant along it. A `wiggle * sin(3x)` term makes
eps nonlinear for the parity checks.

Parity with diffusers: both sides run on the model's own float32 alphas_cumprod (diffusers builds
its "scaled_linear" schedule in float32 arithmetic, up to 1e-6 away; `test_diffusers_schedule_...`
checks that difference on its own), so trajectories differ by update rounding only: ~1e-7 relative
in float32 (hence the 1e-5 bound, room for 50 steps to accumulate), ~1e-15 in float64 where
diffusers keeps float64 (DDIM, PNDM; its DPM-Solver computes in float32).
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.guidance import GUIDANCE_HALVES, ClassifierFreeGuidance
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling_util import leading_timesteps, linspace_timesteps
from ldm.modules.step_context import StepContext
from ldm.modules.diffusionmodules.util import make_beta_schedule

SAMPLERS = [DDIMSampler, PLMSSampler, DPMSolverSampler]
BATCH, SHAPE = 2, (4, 8, 8)
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


class GaussianDataModel(torch.nn.Module):
    """Stand-in for LatentDiffusion with the exact eps of Gaussian data (see module docstring)."""

    num_timesteps = 1000
    parameterization = "eps"

    def __init__(self, data_std: float = 0.5, wiggle: float = 0.0) -> None:
        super().__init__()
        # As LatentDiffusion registers it: float64 schedule, stored as float32 buffers.
        betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
        alphas_cumprod = np.cumprod(1.0 - betas)
        self.register_buffer("betas", torch.tensor(betas, dtype=torch.float32))
        self.register_buffer("alphas_cumprod", torch.tensor(alphas_cumprod, dtype=torch.float32))
        self.register_buffer("alphas_cumprod_prev",
                             torch.tensor(np.append(1.0, alphas_cumprod[:-1]), dtype=torch.float32))
        self.data_std, self.wiggle = data_std, wiggle
        self.timesteps_seen: list[int] = []
        self.steps_seen: list[StepContext] = []  # the step context of every call, in order

    def data_mean(self, cond: torch.Tensor) -> torch.Tensor:
        return cond.mean(dim=(1, 2)).view(-1, 1, 1, 1)  # (B, 77, D) -> (B, 1, 1, 1)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                    step: StepContext = None) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        self.timesteps_seen.append(int(t[0]))
        self.steps_seen.append(step)
        a = self.alphas_cumprod[t].to(x.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        mu = self.data_mean(cond)
        eps = (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * self.data_std ** 2 + 1 - a)
        return eps + self.wiggle * torch.sin(3 * x)

    def exact_ode_solution(self, x: torch.Tensor, cond: torch.Tensor, a_start: float, a_end: float) -> torch.Tensor:
        mu, var = self.data_mean(cond), self.data_std ** 2
        scale = ((a_end * var + 1 - a_end) / (a_start * var + 1 - a_start)) ** 0.5
        return a_end ** 0.5 * mu + scale * (x - a_start ** 0.5 * mu)


class ConditioningEchoModel(GaussianDataModel):
    """eps = the conditioning's mean, broadcast: shows which conditioning each batch row received."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[tuple[torch.Tensor, object]] = []

    def apply_model(self, x, t, cond, step=None):
        self.inputs.append((x, cond))
        if not isinstance(cond, torch.Tensor):  # list / dict conditioning: only the inputs matter
            return torch.zeros_like(x)
        return self.data_mean(cond).expand_as(x).clone()


def inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(BATCH, *SHAPE, generator=g).to(dtype)
    cond = (torch.randn(BATCH, 77, 8, generator=g) * 0.5 + 0.3).to(dtype)
    return x_T, cond


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def diffusers_trajectory(scheduler, model, num_steps, x, cond, step_kwargs=lambda i: {}):
    scheduler.set_timesteps(num_steps)
    for i, t in enumerate(scheduler.timesteps):
        eps = model.apply_model(x, t.expand(x.shape[0]), cond)
        x = scheduler.step(eps, t, x, **step_kwargs(i)).prev_sample
    return x


def use_model_schedule(scheduler, model, dtype):
    scheduler.alphas_cumprod = model.alphas_cumprod.to(dtype)
    scheduler.final_alpha_cumprod = scheduler.alphas_cumprod[0]  # set_alpha_to_one=False
    return scheduler


# --- timestep grids --------------------------------------------------------------------------------

def test_diffusers_scaled_linear_schedule_matches_sd_schedule():
    model = GaussianDataModel()
    torch.testing.assert_close(DDIMScheduler(**SD_SCHEDULE).alphas_cumprod, model.alphas_cumprod, rtol=1e-5, atol=0)


@pytest.mark.parametrize("grid", [leading_timesteps, linspace_timesteps])
def test_every_step_count_gives_exactly_S_distinct_valid_timesteps(grid):
    for num_steps in range(1, 1001):
        timesteps = grid(num_steps, 1000)
        assert len(timesteps) == num_steps
        assert np.all(np.diff(timesteps) > 0), num_steps  # sorted and distinct
        assert 0 <= timesteps[0] and timesteps[-1] <= 999, num_steps


def test_leading_grid_is_diffusers_ddim_leading_with_offset_one():
    scheduler = DDIMScheduler(**SD_SCHEDULE, timestep_spacing="leading", steps_offset=1)
    for num_steps in range(1, 1000):  # diffusers' grid reaches the invalid index 1000 for S = 1000
        scheduler.set_timesteps(num_steps)
        np.testing.assert_array_equal(leading_timesteps(num_steps), scheduler.timesteps.numpy()[::-1])


def test_linspace_grid_is_diffusers_dpm_solver_linspace():
    scheduler = DPMSolverMultistepScheduler(**SD_SCHEDULE, timestep_spacing="linspace")
    for num_steps in range(1, 1000):  # diffusers repeats timesteps for S = 1000
        scheduler.set_timesteps(num_steps)
        np.testing.assert_array_equal(linspace_timesteps(num_steps), scheduler.timesteps.numpy()[::-1])


@pytest.mark.parametrize("sampler_class", SAMPLERS)
def test_samplers_run_every_step_count_including_those_that_crash_compvis(sampler_class):
    model = GaussianDataModel()
    x_T, cond = inputs()
    for num_steps in (1, 3, 9, 27, 36, 999, 1000):
        steps = []
        samples, _ = sampler_class(model).sample(num_steps, BATCH, SHAPE, conditioning=cond, x_T=x_T,
                                                 callback=steps.append, verbose=False)
        assert steps == list(range(num_steps))
        assert torch.isfinite(samples).all()


def test_step_count_outside_the_training_range_is_rejected():
    with pytest.raises(ValueError, match="between 1 and 1000"):
        DDIMSampler(GaussianDataModel()).make_schedule(1001)


# --- DDIM ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("num_steps", [1, 3, 10, 50])
def test_ddim_matches_diffusers_ddim_scheduler(num_steps, eta, dtype, tolerance):
    model = GaussianDataModel(wiggle=0.3)
    x_T, cond = inputs(dtype)
    # Our sampler draws its eta noise from the generator, one (B, C, H, W) tensor per step in order.
    noise_source = torch.Generator().manual_seed(5)
    noises = [torch.randn(BATCH, *SHAPE, generator=noise_source, dtype=dtype) for _ in range(num_steps)]
    scheduler = use_model_schedule(DDIMScheduler(**SD_SCHEDULE, timestep_spacing="leading", steps_offset=1,
                                                 set_alpha_to_one=False, clip_sample=False), model, dtype)
    expected = diffusers_trajectory(scheduler, model, num_steps, x_T, cond,
                                    lambda i: dict(eta=eta, variance_noise=noises[i] if eta > 0 else None))
    samples, _ = DDIMSampler(model).sample(num_steps, BATCH, SHAPE, conditioning=cond, x_T=x_T, eta=eta,
                                           generator=torch.Generator().manual_seed(5), verbose=False)
    assert relative_error(samples, expected) < tolerance


# --- PLMS ------------------------------------------------------------------------------------------

def test_plms_first_step_evaluates_the_model_twice_at_both_ends_of_the_step():
    model = GaussianDataModel()
    x_T, cond = inputs()
    sampler = PLMSSampler(model)
    sampler.sample(5, BATCH, SHAPE, conditioning=cond, x_T=x_T, verbose=False)
    grid = sampler.ddim_timesteps[::-1].tolist()  # sampling order
    assert model.timesteps_seen == [grid[0], grid[1], *grid[1:]]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("num_steps", [2, 3, 4, 5, 10, 50])
def test_plms_matches_diffusers_pndm_without_runge_kutta_steps(num_steps, dtype, tolerance):
    # PNDMScheduler(skip_prk_steps=True) is the same pseudo improved-Euler warm-up followed by 2nd-4th
    # order Adams-Bashforth on eps (for S >= 2; at S = 1 it skips the warm-up, CompVis does not).
    model = GaussianDataModel(wiggle=0.3)
    x_T, cond = inputs(dtype)
    scheduler = use_model_schedule(PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False,
                                                 steps_offset=1, timestep_spacing="leading"), model, dtype)
    expected = diffusers_trajectory(scheduler, model, num_steps, x_T, cond)
    samples, _ = PLMSSampler(model).sample(num_steps, BATCH, SHAPE, conditioning=cond, x_T=x_T, verbose=False)
    assert relative_error(samples, expected) < tolerance


@pytest.mark.parametrize("sampler_class", [PLMSSampler, DPMSolverSampler])
def test_deterministic_samplers_reject_eta(sampler_class):
    with pytest.raises(ValueError, match="eta"):
        sampler_class(GaussianDataModel()).sample(10, BATCH, SHAPE, conditioning=inputs()[1], eta=0.5, verbose=False)


# --- DPM-Solver ------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_steps", [1, 2, 5, 14, 15, 50])
def test_dpm_solver_matches_diffusers_dpmpp_2m(num_steps):
    model = GaussianDataModel(wiggle=0.3)
    x_T, cond = inputs()
    scheduler = DPMSolverMultistepScheduler(**SD_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                            solver_type="midpoint", lower_order_final=True,
                                            final_sigmas_type="sigma_min", timestep_spacing="linspace")
    scheduler.alphas_cumprod = model.alphas_cumprod.clone()
    expected = diffusers_trajectory(scheduler, model, num_steps, x_T, cond)
    samples, _ = DPMSolverSampler(model).sample(num_steps, BATCH, SHAPE, conditioning=cond, x_T=x_T, verbose=False)
    assert relative_error(samples, expected) < 1e-5


def ode_errors(sampler_class, step_counts):
    model = GaussianDataModel()
    x_T, cond = inputs(torch.float64)
    errors = []
    for num_steps in step_counts:
        sampler = sampler_class(model)
        samples, _ = sampler.sample(num_steps, BATCH, SHAPE, conditioning=cond, x_T=x_T, verbose=False)
        exact = model.exact_ode_solution(x_T, cond, float(sampler.ddim_alphas[-1]), float(sampler.ddim_alphas_prev[0]))
        errors.append(relative_error(samples, exact))
    return np.array(errors)


def test_dpm_solver_converges_to_the_exact_ode_solution_at_second_order_and_ddim_at_first():
    dpm_errors, ddim_errors = ode_errors(DPMSolverSampler, [80, 160, 320]), ode_errors(DDIMSampler, [80, 160, 320])
    # Doubling the steps divides the error by ~4 for a second-order method and ~2 for a first-order one.
    assert np.all(dpm_errors[:-1] / dpm_errors[1:] > 2.8), dpm_errors
    assert np.all(ddim_errors[:-1] / ddim_errors[1:] < 2.3), ddim_errors
    assert dpm_errors[-1] < 5e-3


def test_plms_is_far_more_accurate_than_ddim_at_equal_steps():
    assert ode_errors(PLMSSampler, [50])[0] < ode_errors(DDIMSampler, [50])[0] / 10


@pytest.mark.parametrize("sampler_class", SAMPLERS)
@pytest.mark.parametrize("num_steps", [2, 7, 50])
def test_samplers_are_exact_when_the_data_is_a_single_point(sampler_class, num_steps):
    # Then eps = (x - sqrt(a) mu) / sqrt(1 - a) is constant along the ODE, which every step integrates exactly.
    model = GaussianDataModel(data_std=0.0)
    x_T, cond = inputs(torch.float64)
    sampler = sampler_class(model)
    samples, _ = sampler.sample(num_steps, BATCH, SHAPE, conditioning=cond, x_T=x_T, verbose=False)
    exact = model.exact_ode_solution(x_T, cond, float(sampler.ddim_alphas[-1]), float(sampler.ddim_alphas_prev[0]))
    assert relative_error(samples, exact) < 1e-10


# --- classifier-free guidance ----------------------------------------------------------------------

def test_guided_batch_is_unconditional_half_first_and_eps_is_extrapolated_from_it():
    assert GUIDANCE_HALVES == ("unconditional", "conditional")
    model = ConditioningEchoModel()
    x = torch.randn(BATCH, *SHAPE)
    unconditional, conditional = torch.full((BATCH, 77, 8), 1.0), torch.full((BATCH, 77, 8), 3.0)
    eps = ClassifierFreeGuidance(model, conditional, unconditional, scale=7.5)(x, 500, 0, 10)
    (x_in, c_in), = model.inputs
    torch.testing.assert_close(x_in, torch.cat([x, x]))
    torch.testing.assert_close(c_in, torch.cat([unconditional, conditional]))
    torch.testing.assert_close(eps, torch.full_like(x, 1.0 + 7.5 * (3.0 - 1.0)))


@pytest.mark.parametrize("scale, with_unconditional", [(1.0, True), (7.5, False)])
def test_unguided_calls_run_only_the_conditional_batch(scale, with_unconditional):
    model = ConditioningEchoModel()
    x, conditional = torch.randn(BATCH, *SHAPE), torch.full((BATCH, 77, 8), 3.0)
    unconditional = torch.zeros_like(conditional) if with_unconditional else None
    eps = ClassifierFreeGuidance(model, conditional, unconditional, scale=scale)(x, 500, 0, 10)
    (x_in, c_in), = model.inputs
    assert x_in.shape[0] == BATCH and c_in is conditional
    torch.testing.assert_close(eps, torch.full_like(x, 3.0))


def test_list_and_dict_conditionings_are_batched_element_by_element():
    model = ConditioningEchoModel()
    c, u = torch.ones(BATCH, 77, 8), torch.zeros(BATCH, 77, 8)
    c_image, u_image = torch.ones(BATCH, 4, 8, 8), torch.zeros(BATCH, 4, 8, 8)
    guide = ClassifierFreeGuidance(model, {"c_crossattn": [c], "c_concat": [c_image]},
                                   {"c_crossattn": [u], "c_concat": [u_image]}, scale=2.0)
    guide(torch.randn(BATCH, *SHAPE), 10, 0, 1)
    (_, c_in), = model.inputs
    torch.testing.assert_close(c_in["c_crossattn"][0], torch.cat([u, c]))
    torch.testing.assert_close(c_in["c_concat"][0], torch.cat([u_image, c_image]))


@pytest.mark.parametrize("sampler_class, calls_per_step", [(DDIMSampler, [1, 1, 1, 1]), (PLMSSampler, [2, 1, 1, 1]),
                                                           (DPMSolverSampler, [1, 1, 1, 1])])
@pytest.mark.parametrize("scale, halves", [(7.5, 2), (1.0, 1)])
def test_every_model_call_gets_its_own_step_context_with_halves_step_progress_and_latent_size(
        sampler_class, calls_per_step, scale, halves):
    model = GaussianDataModel()
    x_T, cond = inputs()
    sampler_class(model).sample(4, BATCH, SHAPE, conditioning=cond, x_T=x_T, verbose=False,
                                unconditional_guidance_scale=scale, unconditional_conditioning=torch.zeros_like(cond))
    expected = [(halves, step / 4) for step, calls in enumerate(calls_per_step) for _ in range(calls)]
    assert [(step.halves, step.progress) for step in model.steps_seen] == expected
    assert all(step.latent_size == SHAPE[-2:] for step in model.steps_seen)
    assert len({id(step) for step in model.steps_seen}) == len(model.steps_seen)  # one object per call


# --- img2img: stochastic_encode / decode -----------------------------------------------------------

def ddim_with_schedule(model, num_steps=10):
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=num_steps, ddim_eta=0.0, verbose=False)
    return sampler


def test_decode_at_strength_one_equals_sampling_from_the_same_noise():
    model = GaussianDataModel(wiggle=0.3)
    x_T, cond = inputs()
    samples, _ = DDIMSampler(model).sample(10, BATCH, SHAPE, conditioning=cond, x_T=x_T, verbose=False)
    decoded = ddim_with_schedule(model).decode(x_T, cond, t_start=int(1.0 * 10), verbose=False)
    torch.testing.assert_close(decoded, samples, rtol=0, atol=0)


@pytest.mark.parametrize("t_start", [0, 1, 3])
def test_decode_runs_only_the_last_t_start_steps(t_start):
    model = GaussianDataModel()
    x_T, cond = inputs()
    sampler = ddim_with_schedule(model)
    steps = []
    decoded = sampler.decode(x_T, cond, t_start, callback=steps.append, verbose=False)
    assert model.timesteps_seen == sampler.ddim_timesteps[:t_start][::-1].tolist()
    assert steps == list(range(t_start))
    # The layers hear each step's place in the whole 10-step grid: decode's first step is step 10 - t_start.
    assert [step.progress for step in model.steps_seen] == [(10 - t_start + i) / 10 for i in range(t_start)]
    if t_start == 0:
        assert torch.equal(decoded, x_T)


@pytest.mark.parametrize("t_enc", [0, 1, 5, 10])
def test_stochastic_encode_noises_to_the_level_where_decode_starts(t_enc):
    model = GaussianDataModel()
    x0, cond = inputs()
    noise = torch.randn_like(x0)
    sampler = ddim_with_schedule(model)
    encoded = sampler.stochastic_encode(x0, torch.tensor([t_enc] * BATCH), noise=noise)
    sampler.decode(encoded, cond, t_enc, verbose=False)
    start_timestep = model.timesteps_seen[0] if t_enc > 0 else 0  # t_enc = 0: decode ends where it starts
    a = model.alphas_cumprod[start_timestep]
    torch.testing.assert_close(encoded, a.sqrt() * x0 + (1 - a).sqrt() * noise)


def test_stochastic_encode_with_original_steps_is_q_sample_at_the_training_timestep():
    model = GaussianDataModel()
    x0, noise = torch.randn(BATCH, *SHAPE), torch.randn(BATCH, *SHAPE)
    t = torch.tensor([10, 900])
    encoded = ddim_with_schedule(model).stochastic_encode(x0, t, use_original_steps=True, noise=noise)
    a = model.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(encoded, a.sqrt() * x0 + (1 - a).sqrt() * noise)


def test_img2img_t_start_beyond_the_schedule_is_rejected():
    sampler = ddim_with_schedule(GaussianDataModel())
    with pytest.raises(ValueError, match="strength"):
        sampler.decode(torch.randn(BATCH, *SHAPE), inputs()[1], 11, verbose=False)
    with pytest.raises(ValueError, match="strength"):
        sampler.stochastic_encode(torch.randn(BATCH, *SHAPE), 11)


# --- reproducibility, callbacks, CompVis options ---------------------------------------------------

@pytest.mark.parametrize("sampler_class, eta", [(DDIMSampler, 0.5), (PLMSSampler, 0.0), (DPMSolverSampler, 0.0)])
def test_same_generator_seed_gives_identical_samples(sampler_class, eta):
    model, cond = GaussianDataModel(), inputs()[1]

    def run(seed):
        return sampler_class(model).sample(8, BATCH, SHAPE, conditioning=cond, eta=eta, verbose=False,
                                           generator=torch.Generator().manual_seed(seed))[0]

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_ddim_eta_noise_comes_from_the_generator():
    model, (x_T, cond) = GaussianDataModel(), inputs()

    def run(seed):
        return DDIMSampler(model).sample(8, BATCH, SHAPE, conditioning=cond, x_T=x_T, eta=1.0, verbose=False,
                                         generator=torch.Generator().manual_seed(seed))[0]

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_one_generator_per_image_makes_each_image_independent_of_its_batch_mates():
    # x_T and DDIM's eta noise both come from image i's own generator when a list is given.
    model, cond = GaussianDataModel(), inputs()[1]

    def run(seeds, conditioning):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return DDIMSampler(model).sample(8, len(seeds), SHAPE, conditioning=conditioning, eta=1.0,
                                         verbose=False, generator=generators)[0]

    both, alone = run([5, 6], cond), run([6], cond[1:])
    torch.testing.assert_close(both[1:], alone)
    assert not torch.allclose(both[0], both[1])
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        DDIMSampler(model).sample(8, 2, SHAPE, conditioning=cond[:2], eta=1.0, verbose=False,
                                  generator=[torch.Generator() for _ in range(3)])


@pytest.mark.parametrize("sampler_class", SAMPLERS)
def test_callbacks_run_once_per_step_and_intermediates_follow_log_every_t(sampler_class):
    model, (x_T, cond) = GaussianDataModel(), inputs()
    steps, previews = [], []
    samples, intermediates = sampler_class(model).sample(
        10, BATCH, SHAPE, conditioning=cond, x_T=x_T, verbose=False, log_every_t=4,
        callback=steps.append, img_callback=lambda pred_x0, i: previews.append((pred_x0.shape, i)))
    assert steps == list(range(10))
    assert previews == [((BATCH, *SHAPE), i) for i in range(10)]
    # x_T, then grid positions 9 (first step), 8, 4 and 0 (the last step, whose output is the sample).
    assert len(intermediates["x_inter"]) == len(intermediates["pred_x0"]) == 5
    assert intermediates["x_inter"][0] is x_T and intermediates["x_inter"][-1] is samples


def test_compvis_keywords_are_accepted_at_their_defaults_and_rejected_otherwise():
    model, (x_T, cond) = GaussianDataModel(), inputs()
    compvis_defaults = dict(normals_sequence=None, quantize_x0=False, mask=None, x0=None, temperature=1.0,
                            noise_dropout=0.0, score_corrector=None, corrector_kwargs=None)
    DDIMSampler(model).sample(2, BATCH, SHAPE, conditioning=cond, x_T=x_T, verbose=False, **compvis_defaults)
    with pytest.raises(NotImplementedError, match="mask"):
        DDIMSampler(model).sample(2, BATCH, SHAPE, conditioning=cond, verbose=False, mask=torch.ones(1), x0=x_T)
    with pytest.raises(TypeError, match="not_an_option"):
        DDIMSampler(model).sample(2, BATCH, SHAPE, conditioning=cond, verbose=False, not_an_option=1)
