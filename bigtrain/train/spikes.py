"""Loss-spike policy (``train.on_spike``): skip an update whose loss or gradient norm jumps far above
its recent level, the way OLMo-core's skip-step optimizers do.

:class:`SpikeWindow` keeps the last ``train.spike_window`` *accepted* (loss, grad norm) pairs as a
device-side buffer. Once it is full, a step whose loss or grad norm exceeds the window's mean by
more than ``train.spike_sigma`` (sample) standard deviations is a spike. Skipped steps never enter
the window, so one spike does not widen the band that judges the next. A run of ``spike_window``
skips in a row is not a spike but a new level (new data, a schedule change): the window then starts
over (and warms up again), so training never stalls on a lasting shift.

All of that is tensor arithmetic on the device: deciding costs a dozen tiny kernels and no host
sync. Applying the decision is :meth:`SpikeGuard.allows_update`:

* an optimizer that can skip its own step on the device — torch's *fused* Adam/AdamW (what
  bigtrain builds on CUDA) takes a ``found_inf`` flag, the one ``torch.amp.GradScaler`` uses; with
  it set the kernel leaves parameters, both moments and the step count untouched — is given the
  flag and the update is always "applied": **no host sync per step**;
* any other optimizer (foreach AdamW on CPU, Muon) gets a host-side decision: one read of the
  flag per step. On the CPU that read is free (no device to wait for); on a GPU it is one sync per
  step, the same price as ``train.on_nonfinite=skip``.

Skipping by zeroing the gradients or the learning rate would not be exact: Adam's moments decay
and its bias correction advances on every step it runs.

The values compared are identical on every rank (the all-reduced loss, the global grad norm), so
all ranks take the same decision without another collective. Non-finite values are left to
``train.on_nonfinite`` (checked first): they never enter the window and are never called spikes.
The window, the counters and the largest z-score since the last log record are part of the
checkpoint (:meth:`SpikeGuard.state_dict`), so a resumed run decides exactly as the straight one.
"""
from __future__ import annotations

from typing import Any

import torch

from bigtrain import messages


class SpikeWindow:
    """Rolling mean and sample standard deviation of the last ``size`` accepted (loss, grad norm) pairs.

    Row 0 of :attr:`values` holds losses, row 1 grad norms, in float64 (the z-score of a loss near 2
    with a spread of 1e-3 must not be float32 rounding). The buffer shifts left and appends on an
    accepted step, so its order is oldest → newest; ``count`` is how many accepted steps it has seen
    since it last started over (full once ``count >= size``).
    """

    def __init__(self, size: int, sigma: float, device: torch.device) -> None:
        if size < 2:
            raise ValueError(f"a spike window needs at least 2 steps, got {size}")
        self.size, self.sigma = size, sigma
        self.values = torch.zeros((2, size), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)

    def z_scores(self, pair: torch.Tensor) -> torch.Tensor:
        """(z of the loss, z of the grad norm) against the window; meaningful once :meth:`full`.

        A constant window (standard deviation 0) gives +inf above its mean and 0 at or below it."""
        std, mean = torch.std_mean(self.values, dim=1)
        excess = pair - mean
        return torch.where(std > 0, excess / std.clamp_min(torch.finfo(torch.float64).tiny),
                           torch.where(excess > 0, torch.inf, 0.0))

    def full(self) -> torch.Tensor:
        return self.count >= self.size

    def push(self, pair: torch.Tensor, accept: torch.Tensor) -> None:
        """Append ``pair`` where ``accept`` (a device bool) is true; no host sync either way."""
        shifted = torch.cat([self.values[:, 1:], pair[:, None]], dim=1)
        self.values = torch.where(accept, shifted, self.values)
        self.count = self.count + accept.to(torch.int64)

    def restart(self, where: torch.Tensor) -> None:
        """Forget everything where ``where`` is true (the next ``size`` steps warm the window up again)."""
        self.count = torch.where(where, torch.zeros_like(self.count), self.count)


class SpikeGuard:
    """Applies ``train.on_spike`` to each step's (global) loss and grad norm: one call per step."""

    def __init__(self, policy: str, window: int, sigma: float, device: torch.device) -> None:
        if policy not in ("off", "skip"):
            raise ValueError(f"unknown spike policy {policy!r}")
        self.enabled = policy == "skip"
        self.device = device
        self.window = SpikeWindow(window, sigma, device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)  # spikes skipped over the whole run
        self.in_a_row = torch.zeros((), dtype=torch.int64, device=device)  # the current run of skips
        # Largest z-score (loss or grad norm) since the last log record; -inf = none judged yet.
        self.z_max = torch.full((), -torch.inf, dtype=torch.float64, device=device)
        self._reported = 0  # skips already announced on the console (this process)

    # ------------------------------------------------------------------ the decision (device only)
    def decide(self, loss: torch.Tensor, grad_norm: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """(accept: device bool, z-scores (loss, grad norm)) for this step; updates the window and counters."""
        pair = torch.stack([loss.detach().to(torch.float64).reshape(()),
                            torch.as_tensor(grad_norm, device=loss.device).to(torch.float64).reshape(())])
        w = self.window
        finite = torch.isfinite(pair).all()
        z = w.z_scores(pair)
        judged = w.full() & finite  # warm-up: no verdict; non-finite: on_nonfinite's business
        spike = judged & (z > w.sigma).any()
        accept = ~spike
        w.push(pair, accept & finite)
        self.skipped = self.skipped + spike.to(torch.int64)
        self.in_a_row = torch.where(spike, self.in_a_row + 1, torch.zeros_like(self.in_a_row))
        new_level = self.in_a_row >= w.size  # a "spike" as long as the window: the level moved
        w.restart(new_level)
        self.in_a_row = torch.where(new_level, torch.zeros_like(self.in_a_row), self.in_a_row)
        self.z_max = torch.where(judged, torch.maximum(self.z_max, z.max()), self.z_max)
        return accept, z

    def allows_update(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | float,
                      optimizer: torch.optim.Optimizer) -> bool:
        """The whole policy for step ``step`` (1-based): True = call the optimizer step.

        ``off``: always True, no work. ``skip``: the decision is taken on the device; an optimizer
        that can skip on the device gets it as its ``found_inf`` flag (True is returned and the
        kernel does nothing on a spike, no host sync); otherwise the flag is read on the host.
        """
        if not self.enabled:
            return True
        accept, z = self.decide(loss, grad_norm)
        if skips_on_device(optimizer):
            optimizer.found_inf = (~accept).to(torch.float32)  # type: ignore[attr-defined]  # read by Adam.step
            return True
        if bool(accept.item()):  # free on the CPU; one sync per step on a GPU (see the module docstring)
            return True
        z_loss, z_norm = z.tolist()
        messages.say(f"bigtrain: step {step}: loss spike, update skipped (z-score {z_loss:.1f} for the loss, "
                     f"{z_norm:.1f} for the gradient norm, over the last {self.window.size} steps; "
                     f"{int(self.skipped.item())} in total)")
        self._reported = int(self.skipped.item())
        return False

    # ------------------------------------------------------------------ log steps (they sync anyway)
    def record(self, step: int) -> dict[str, Any]:
        """The train record's fields (empty when off): ``spike_skips`` (updates skipped as spikes so far
        in the run) and ``spike_z`` (largest z-score of the steps since the last record; None while the
        window warms up). Announces skips the host did not see (device-side skipping)."""
        if not self.enabled:
            return {}
        skipped, z_max = int(self.skipped.item()), float(self.z_max.item())
        self.z_max = torch.full_like(self.z_max, -torch.inf)
        if skipped > self._reported:
            messages.say(f"bigtrain: {skipped - self._reported} update(s) skipped as loss spikes up to step {step} "
                         f"(largest z-score {z_max:.1f}, over the last {self.window.size} steps; {skipped} in total)")
            self._reported = skipped
        return {"spike_skips": skipped, "spike_z": z_max if z_max != -float("inf") else None}

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors (CPU copies happen in the checkpoint staging) — identical on every rank."""
        return {"values": self.window.values, "count": self.window.count, "skipped": self.skipped,
                "in_a_row": self.in_a_row, "z_max": self.z_max}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved window; one of another ``spike_window`` size is dropped (warm up again)."""
        values = state["values"]
        if values.shape == self.window.values.shape:
            self.window.values = values.to(self.device, torch.float64)
            self.window.count = state["count"].to(self.device)
            self.in_a_row = state["in_a_row"].to(self.device)
            self.z_max = state["z_max"].to(self.device)
        else:
            messages.warn(f"warning: train.spike_window changed from {values.shape[1]} to {self.window.size}; the "
                          f"loss-spike window warms up again")
        self.skipped = state["skipped"].to(self.device)
        self._reported = int(self.skipped.item())


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """True for torch's fused Adam/AdamW, whose step honours a device-side ``found_inf`` flag exactly
    (parameters, moments and step count untouched). Other optimizers would ignore the flag."""
    return (isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)
            and all(group.get("fused") for group in optimizer.param_groups))
