"""Inference policies: the uniform random policy of cycle 0 and the PAC network policy."""

from __future__ import annotations

import io
import logging
import warnings
from typing import Callable, Protocol

import numpy as np
import torch

from policies.perceiver import PerceiverActorCritic, PerceiverConfig
from policies.snapshot import Snapshot, SnapshotError
from replay.spec import EnvSpec, PolicyVersion

log = logging.getLogger(__name__)


class Policy(Protocol):
    """Chooses actions for a batch of observations.

    Usage:
        actions = policy.act(observations, task_ids, greedy=False)   # (B, A) float32
    """

    policy_version: PolicyVersion

    def act(self, observation: np.ndarray, task_id: np.ndarray, greedy: bool,
            pixels: np.ndarray | None = None) -> np.ndarray:
        """observation (B, obs_dim) float32, task_id (B,) int, pixels (B, H, W, 3) uint8 when
        the spec has a camera -> actions (B, A) float32."""
        ...


class RandomPolicy:
    """Uniform over the action bins of every dimension: policy version 0."""

    policy_version: PolicyVersion = 0

    def __init__(self, spec: EnvSpec, num_action_bins: int, seed: int):
        self._centres = np.linspace(spec.action_min, spec.action_max, num_action_bins,
                                    dtype=np.float32)
        self._action_dim = spec.action_dim
        self._rng = np.random.default_rng(seed)

    def act(self, observation: np.ndarray, task_id: np.ndarray, greedy: bool,
            pixels: np.ndarray | None = None) -> np.ndarray:
        bins = self._rng.integers(0, len(self._centres), (observation.shape[0], self._action_dim))
        return self._centres[bins]


class PolicyLogits(torch.nn.Module):
    """observation (B, obs_dim), task_id (B,)[, pixels (B, H, W, 3)] -> policy logits (B, A, K):
    the part of the network acting needs, as one module (to export)."""

    def __init__(self, model: PerceiverActorCritic):
        super().__init__()
        self.model = model

    def forward(self, observation: torch.Tensor, task_id: torch.Tensor,
                pixels: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.policy_logits(self.model.encode(observation, task_id, pixels))


def export_policy_logits(model: PerceiverActorCritic) -> bytes:
    """PolicyLogits as an ONNX graph (opset 17) whose batch axis is free: inputs "observation"
    (B, obs_dim) float32, "task_id" (B,) int64[, "pixels" (B, H, W, 3) uint8], output "logits"
    (B, A, K). The weights are copied in: the graph does not follow later changes to `model`."""
    spec = model.spec
    example = (torch.zeros(1, spec.obs_dim), torch.zeros(1, dtype=torch.int64))
    names = ["observation", "task_id"]
    if spec.pixels_shape:
        example += (torch.zeros(1, *spec.pixels_shape, dtype=torch.uint8),)
        names.append("pixels")
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on traced shapes
        torch.onnx.export(PolicyLogits(model).eval(), example, buffer, dynamo=False,
                          input_names=names, output_names=["logits"], opset_version=17,
                          dynamic_axes={n: {0: "batch"} for n in [*names, "logits"]})
    return buffer.getvalue()


class OnnxPolicyLogits:
    """PolicyLogits run by ONNX Runtime on the CPU, on the calling thread (intra-op threads:
    torch's setting, 1 in an actor): a small network's cost is mostly per operation, and ONNX
    Runtime's per-operation cost is lower than torch's: the tiny preset at batch 1 runs in
    about half the time of a frozen TorchScript trace (docs/benchmarks.md, "Actors").

    The network is exported once; each batch size it meets gets a session of its own with that
    size fixed (up to STATIC_SESSIONS sizes, ~20 ms each to build), so ONNX Runtime folds the
    shape arithmetic a free batch axis leaves in the graph (half of its operations for tiny):
    an actor's batch is its number of envs, nearly always the same. Sizes past that (a
    gateway's varying batches) share one session with the batch axis free."""

    STATIC_SESSIONS = 4

    def __init__(self, model: PerceiverActorCritic):
        self._graph = export_policy_logits(model)
        self._sessions: dict[int | None, object] = {}
        self._session(None)  # the free-batch one now: a graph ONNX Runtime refuses fails here

    def _session(self, batch: int | None):  # -> onnxruntime.InferenceSession
        session = self._sessions.get(batch)  # every call but a new size's first: one lookup
        if session is None:
            fixed = len(self._sessions) - (None in self._sessions)  # sessions of a fixed size
            key = batch if fixed < self.STATIC_SESSIONS else None
            session = self._sessions.get(key) or self._new_session(key)
            self._sessions[key] = session
        return session

    def _new_session(self, batch: int | None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        # With more than one thread, idle pool threads would spin after each call, taking CPU
        # from the simulators and gRPC threads beside them.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if batch is not None:
            options.add_free_dimension_override_by_name("batch", batch)
        return onnxruntime.InferenceSession(self._graph, options,
                                            providers=["CPUExecutionProvider"])

    def __call__(self, observation: np.ndarray, task_id: np.ndarray,
                 pixels: np.ndarray | None = None) -> np.ndarray:
        feed = {"observation": observation, "task_id": task_id}
        if pixels is not None:
            feed["pixels"] = pixels
        return self._session(len(observation)).run(None, feed)[0]  # (B, A, K) float32


# ONNX Runtime copies the weights and helps where per-operation overhead dominates.
ONNX_MAX_PARAMETERS = 20_000_000  # larger networks run in torch (their compute dominates)


class PACPolicy:
    """Samples (or, greedy, takes the per-dimension mode of) the PAC policy head.

    A network of up to ONNX_MAX_PARAMETERS runs in ONNX Runtime (OnnxPolicyLogits), exported
    at its first use (one graph, a session per batch size); a larger one, or one the exporter
    cannot take, runs in torch. A policy is one version, so its model must not change after it acts.
    Sampling is Gumbel-max on the logits (NumPy, seeded): a draw from each dimension's
    softmax."""

    def __init__(self, model: PerceiverActorCritic, policy_version: PolicyVersion, seed: int):
        self.model = model.eval()
        self.policy_version = policy_version
        self._rng = np.random.default_rng(seed)
        self._onnx = sum(p.numel() for p in model.parameters()) <= ONNX_MAX_PARAMETERS
        self._logits: Callable[..., np.ndarray] | None = None
        self._centres = model.bin_centres.cpu().numpy()  # (K,) action of each bin

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, seed: int) -> "PACPolicy":
        spec = EnvSpec.from_dict(snapshot.metadata["env_spec"])
        model = PerceiverActorCritic(spec, PerceiverConfig(**snapshot.metadata["model_config"]))
        try:
            model.load_state_dict(snapshot.state_dict())
        except RuntimeError as e:  # missing or unexpected weights: another network layout
            raise SnapshotError(f"snapshot v{snapshot.version} does not fit this network "
                                f"(made by another pacflow version?): "
                                f"{str(e).splitlines()[0]}") from e
        return cls(model, snapshot.version, seed)

    def _torch_logits(self, observation: np.ndarray, task_id: np.ndarray,
                      pixels: np.ndarray | None = None) -> np.ndarray:
        inputs = (torch.from_numpy(observation), torch.from_numpy(task_id)) + \
            (() if pixels is None else (torch.from_numpy(pixels),))
        with torch.inference_mode():
            return PolicyLogits(self.model)(*inputs).numpy()

    def policy_logits(self, observation: np.ndarray, task_id: np.ndarray,
                      pixels: np.ndarray | None = None) -> np.ndarray:
        """observation (B, obs_dim) float32, task_id (B,) int64[, pixels (B, H, W, 3) uint8]
        -> logits (B, A, K) float32."""
        if self._logits is None:
            self._logits = self._torch_logits
            if self._onnx:
                try:
                    self._logits = OnnxPolicyLogits(self.model)
                except Exception as e:  # an operation the exporter cannot take: run in torch
                    log.warning("policy runs in torch, not ONNX Runtime: %s", e)
        return self._logits(observation, task_id, pixels)

    def act(self, observation: np.ndarray, task_id: np.ndarray, greedy: bool,
            pixels: np.ndarray | None = None) -> np.ndarray:
        logits = self.policy_logits(
            np.ascontiguousarray(observation, np.float32),
            np.ascontiguousarray(task_id, np.int64),
            None if pixels is None else np.ascontiguousarray(pixels, np.uint8))  # (B, A, K)
        if not greedy:  # Gumbel-max: argmax(logits + Gumbel noise) ~ softmax(logits)
            logits = logits - np.log(-np.log(self._rng.random(logits.shape)))
        return self._centres[logits.argmax(-1)]  # (B, A) float32
