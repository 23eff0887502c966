"""The PAC learner: holds the network, target network, temperature and optimisers; `step()` reads
top to bottom like the loss in notes/pac.md §8.4."""

from __future__ import annotations

import copy
import logging
import time
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from learners import losses
from learners.checkpoints import CheckpointError
from learners.config import CriticTarget, LearnerConfig, TargetUpdate
from policies.normalization import BatchMoments, batch_moments
from policies.perceiver import (PerceiverActorCritic, PerceiverConfig, count_parameters,
                                init_temperature_param)
from replay.spec import Batch, EnvSpec

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class PACLearner:
    """Trains a PerceiverActorCritic on batches drawn from an injected iterator.

    Usage:
        learner = PACLearner(spec, model_config, learner_config, iter(batches))
        metrics = learner.run(num_steps=100)
        params = learner.get_variables()
    """

    def __init__(self, spec: EnvSpec, model_config: PerceiverConfig, config: LearnerConfig,
                 iterator: Iterator[Batch], seed: int = 0,
                 gradient_hook: Callable[[Iterable[torch.Tensor]], None] | None = None,
                 moments_hook: Callable[[BatchMoments], BatchMoments] | None = None):
        """`gradient_hook(parameters)` runs between backward and the optimizer step, e.g.
        `learners.distributed.allreduce_gradients` for data-parallel replicas;
        `moments_hook(moments)` sums each batch's observation moments over the replicas
        (`learners.distributed.allreduce_moments`), so their normalisers stay identical."""
        torch.manual_seed(seed)
        self.config, self.iterator, self.gradient_hook = config, iterator, gradient_hook
        self.moments_hook = moments_hook
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)
        self.model = PerceiverActorCritic(spec, model_config).to(self.device)
        self.target = copy.deepcopy(self.model).requires_grad_(False)
        self.log_temperature = torch.tensor(init_temperature_param(config.init_temperature),
                                            device=self.device, requires_grad=True)
        cuda = self.device.type == "cuda"
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate,
                                          fused=True)  # fused kernels on CUDA and on CPU
        self._autocast = dict(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=cuda and config.bf16_autocast)
        if config.compile:
            for m in (self.model, self.target):
                m.encode = torch.compile(m.encode)
                m.q_logits = torch.compile(m.q_logits)
        self.log_entropy_multiplier = torch.tensor(init_temperature_param(1.0),
                                                   device=self.device, requires_grad=True)
        self.dual_optimizer = torch.optim.Adam([self.log_temperature,
                                                self.log_entropy_multiplier],
                                               lr=config.dual_learning_rate)
        self.num_steps = 0
        log.info("PAC model: %d parameters on %s", count_parameters(self.model), self.device)

    @property
    def temperature(self) -> torch.Tensor:
        return F.softplus(self.log_temperature) + 1e-8

    def step(self) -> dict[str, float]:
        """One PAC update on the next batch; returns scalar metrics."""
        cfg, model, target = self.config, self.model, self.target
        t0 = time.perf_counter()
        batch = next(self.iterator).to(self.device, non_blocking=True)
        t_data = time.perf_counter() - t0
        n = batch.reward.shape[1] - 1
        s, task = batch.observation[:, 0], batch.task_id  # (B, O), (B,)
        B, A, K = s.shape[0], self.model.spec.action_dim, self.model.config.num_action_bins
        a_data = model.action_to_bins(batch.action[:, 0])  # (B, A)
        a_mask = model.action_mask(task)  # (B, A) for mixed-size tasks, else None
        ret = losses.n_step_return(batch.reward[:, :n], batch.discount[:, :n],
                                   batch.mask[:, :n], cfg.discount)
        rows = torch.arange(s.shape[0], device=s.device)
        s_boot = batch.observation[rows, ret.bootstrap_index]  # (B, O)
        img = img_boot = None
        if batch.pixels is not None:  # (B, n+1, H, W, 3) uint8
            img, img_boot = batch.pixels[:, 0], batch.pixels[rows, ret.bootstrap_index]

        self._update_normalizer(s, task)

        with torch.autocast(**self._autocast):  # bf16 forward on CUDA; a no-op on CPU
            z = model.encode(s, task, img)  # (B, L, W)
            logits_pi = model.policy_logits(z).float()  # (B, A, K)
            with torch.no_grad():
                # One target encode for s_t and s_{t+n} together.
                both = None if img is None else torch.cat([img, img_boot])
                z_tgt, z_boot = target.encode(torch.cat([s, s_boot]), torch.cat([task, task]),
                                              both).chunk(2)
                # E-step: every bin of every dimension scored by the online critic
                # (stop-gradient), the other dimensions from N samples of π_θ'.
                prior_logits = target.policy_logits(z_tgt).float()  # (B, A, K)
                context = torch.distributions.Categorical(logits=prior_logits).sample(
                    (cfg.num_context_samples,)).transpose(0, 1)  # (B, N, A)
                candidates = losses.per_dimension_candidates(context, K)  # (B, N, A, K, A)
                q_cand = model.q_value(model.q_logits(
                    z, candidates.reshape(B, -1, A), a_mask).float())  # (B, N*A*K)
                q_cand = q_cand.view(B, -1, A, K).mean(1)  # (B, A, K)
                temperature = self.temperature.detach()
                log_improved = losses.improved_log_probs(prior_logits, q_cand, temperature)
                # Γ_θ': bootstrap with a' ~ π_θ'(s_{t+n}) under the target critic, C51-projected.
                a_next = torch.distributions.Categorical(
                    logits=target.policy_logits(z_boot)).sample()  # (B, A)
                p_next = target.q_logits(z_boot, a_next.unsqueeze(1), a_mask)[:, 0].float()
                p_next = p_next.softmax(-1)  # (B, M)
                target_probs = self._target_distribution(ret, p_next)  # (B, M)

            l_imp = losses.policy_improvement_loss(logits_pi, log_improved, a_mask)
            l_bc = losses.behaviour_cloning_loss(logits_pi, a_data, a_mask)
            q_logits_data = model.q_logits(z, a_data.unsqueeze(1), a_mask)[:, 0].float()
        l_q = losses.critic_loss(q_logits_data, target_probs)
        l_eta = losses.temperature_dual_loss(prior_logits, q_cand, self.temperature,
                                             cfg.epsilon, a_mask)
        loss = losses.pac_loss(l_imp, l_bc, l_q, l_eta, cfg.alpha, cfg.beta)
        if cfg.min_entropy > 0:
            multiplier = F.softplus(self.log_entropy_multiplier)
            loss = loss + losses.entropy_floor_loss(logits_pi, multiplier, cfg.min_entropy, a_mask)

        self.optimizer.zero_grad(set_to_none=True)
        self.dual_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.gradient_hook is not None:
            self.gradient_hook([*model.parameters(), self.log_temperature,
                                self.log_entropy_multiplier])
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.dual_optimizer.step()
        self.num_steps += 1
        if cfg.target_update is TargetUpdate.POLYAK:
            losses.polyak_update(self.target, self.model, cfg.polyak_tau)
        elif self.num_steps % cfg.target_update_period == 0:
            self.target.load_state_dict(self.model.state_dict())
        return {
            "loss": loss.item(), "l_imp": l_imp.item(), "l_bc": l_bc.item(), "l_q": l_q.item(),
            "temperature": temperature.item(), "grad_norm": grad_norm.item(),
            "entropy_multiplier": F.softplus(self.log_entropy_multiplier).item(),
            "q_mean": q_cand.mean().item(), "data_wait_s": t_data,
            "kl_improved": losses.categorical_kl(log_improved, prior_logits, a_mask).item(),
            "entropy": losses.categorical_entropy(logits_pi.detach(), a_mask).item(),
            "step_s": time.perf_counter() - t0,
        }

    def _update_normalizer(self, observation: torch.Tensor, task_id: torch.Tensor) -> None:
        """Merges this batch into the observation statistics, the same on every replica; the
        target network always normalises with the online network's statistics."""
        moments = batch_moments(observation, task_id, self.model.normalizer.count.shape[0])
        if self.moments_hook is not None:
            moments = self.moments_hook(moments)
        self.model.normalizer.update(moments)
        self.target.normalizer.load_state_dict(self.model.normalizer.state_dict())

    def _target_distribution(self, ret: losses.NStepReturn, p_next: torch.Tensor) -> torch.Tensor:
        """Γ_θ' on the critic's support from the n-step return and the next-state distribution."""
        z = self.model.value_support  # (M,)
        G, D = ret.partial_return.unsqueeze(1), ret.bootstrap_discount.unsqueeze(1)  # (B, 1)
        if self.config.critic_target is CriticTarget.HL_GAUSS:
            q_next = (p_next * z).sum(-1, keepdim=True)  # (B, 1)
            sigma = self.config.hl_gauss_sigma * float(z[1] - z[0])
            return losses.hl_gauss_projection((G + D * q_next).squeeze(1), z, sigma)
        return losses.categorical_projection(G + D * z, p_next, z)

    def run(self, num_steps: int,
            on_update: Callable[[int, dict[str, float]], None] | None = None
            ) -> dict[str, float]:
        """Runs `num_steps` updates, fewer if the batch iterator ends; returns the metrics
        averaged over the updates done. `on_update(num_steps, metrics)` follows each update
        (live metrics)."""
        totals: dict[str, float] = {}
        done = 0
        for _ in range(num_steps):
            try:
                metrics = self.step()
            except StopIteration:  # e.g. ReverbBatchIterator.interrupt(): the run is ending
                break
            done += 1
            if on_update is not None:
                on_update(self.num_steps, metrics)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v
        return {k: v / max(done, 1) for k, v in totals.items()}

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Starts from another network's weights (a snapshot's): online and target alike."""
        self.model.load_state_dict(state_dict)
        self.target.load_state_dict(state_dict)

    def get_variables(self) -> dict[str, torch.Tensor]:
        """The online network's weights on CPU, ready for a snapshot."""
        return {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}

    def state(self) -> dict[str, object]:
        """Everything needed to continue training: for checkpoints."""
        return {
            "model": self.get_variables(),
            "target": {k: v.detach().cpu().contiguous()
                       for k, v in self.target.state_dict().items()},
            "log_temperature": self.log_temperature.detach().cpu().reshape(1),
            "log_entropy_multiplier": self.log_entropy_multiplier.detach().cpu().reshape(1),
            "optimizer": self.optimizer.state_dict(),
            "dual_optimizer": self.dual_optimizer.state_dict(),
            "num_steps": self.num_steps,
            "rng_state": torch.get_rng_state(),
        }

    def restore(self, state: dict[str, object]) -> None:
        """Continues from `state()` output: the next step equals the uninterrupted run's on CPU.
        A checkpoint of another network or learner layout (an older pacflow, another model
        config) raises CheckpointError naming it."""
        try:
            self._restore(state)
        except (KeyError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            raise CheckpointError(f"checkpoint {state.get('path', '')} does not fit this learner "
                                  f"(another pacflow version or model config?): {first}") from e

    def _restore(self, state: dict[str, object]) -> None:
        self.model.load_state_dict(state["model"])
        self.target.load_state_dict(state["target"])
        with torch.no_grad():
            self.log_temperature.copy_(state["log_temperature"].reshape(()))
            self.log_entropy_multiplier.copy_(state["log_entropy_multiplier"].reshape(()))
        self.optimizer.load_state_dict(state["optimizer"])
        self.dual_optimizer.load_state_dict(state["dual_optimizer"])
        self.num_steps = int(state["num_steps"])
        torch.set_rng_state(state["rng_state"])
