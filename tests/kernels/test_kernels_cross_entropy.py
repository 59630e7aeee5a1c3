"""Fused linear + cross-entropy: Triton (CPU interpreter) and torch chunk passes against a float64
reference, with ignore index, z-loss, a vocabulary not divisible by the kernel's vocabulary tile and
a token count not divisible by the chunk; and its peak memory against the naive logits path.
"""
from __future__ import annotations

import pytest
import torch

from tests.kernels.kernel_testing import assert_close, leaf64  # sets TRITON_INTERPRET=1 first

# isort: split

from bigtrain.kernels import reference as ref
from bigtrain.kernels.linear_cross_entropy import default_chunk_tokens, linear_cross_entropy

IGNORE = -100


def make_case(tokens: int, dim: int, vocab: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, dim, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(vocab, dim, generator=gen) / dim ** 0.5 * 2).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    targets[::5] = IGNORE
    targets[-1] = vocab - 1  # the last vocabulary column lives in the masked tail tile
    return h, w, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch-chunks"])
@pytest.mark.parametrize("tokens,dim,vocab,chunk,block,z_loss", [
    (21, 48, 600, 8, 256, 1e-3),     # 600 % 256 != 0, 21 % 8 != 0
    (20, 40, 300, 8, 128, 0.0),      # non-power-of-two hidden, no z-loss
    (9, 24, 77, 64, 32, 1e-2),       # one chunk larger than the tokens
])
def test_fused_linear_ce_matches_float64(dtype: torch.dtype, use_triton: bool, tokens: int, dim: int, vocab: int,
                                         chunk: int, block: int, z_loss: float) -> None:
    h, w, targets = make_case(tokens, dim, vocab, dtype, seed=tokens + vocab)
    loss = linear_cross_entropy(h, w, targets, z_loss=z_loss, chunk_tokens=chunk, block_vocab=block,
                                use_triton=use_triton)
    loss.backward()
    h64, w64 = leaf64(h), leaf64(w)
    expected = ref.linear_cross_entropy(h64, w64, targets, z_loss=z_loss)
    expected.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == dtype and w.grad.dtype == dtype
    assert_close(loss, expected, dtype, "loss")
    assert_close(h.grad, h64.grad, dtype, "d hidden")
    assert_close(w.grad, w64.grad, dtype, "d weight")


def test_z_loss_changes_loss_by_its_term() -> None:
    h, w, targets = make_case(12, 16, 50, torch.float32, seed=3)
    h64, w64 = h.detach().double(), w.detach().double()
    plain = ref.linear_cross_entropy(h64, w64, targets)
    with_z = linear_cross_entropy(h, w, targets, z_loss=0.1, chunk_tokens=5, block_vocab=16)
    lse = torch.logsumexp(h64 @ w64.t(), dim=-1)[targets != IGNORE]
    assert abs(with_z.item() - (plain + 0.1 * lse.pow(2).mean()).item()) < 1e-5 * plain.item()
    assert with_z.item() > plain.item() + 1e-3


def test_ignored_rows_get_no_gradient_and_scale_with_upstream_grad() -> None:
    h, w, targets = make_case(10, 16, 40, torch.float32, seed=4)
    loss = linear_cross_entropy(h, w, targets, chunk_tokens=4, block_vocab=16)
    (3.0 * loss).backward()
    assert torch.all(h.grad[targets == IGNORE] == 0)
    h64, w64 = leaf64(h), leaf64(w)
    (3.0 * ref.linear_cross_entropy(h64, w64, targets)).backward()
    assert_close(h.grad, h64.grad, torch.float32, "scaled d hidden")


def test_all_ignored_gives_zero_loss_not_nan() -> None:
    h, w, _ = make_case(6, 16, 40, torch.float32, seed=5)
    loss = linear_cross_entropy(h, w, torch.full((6,), IGNORE), chunk_tokens=4, block_vocab=16)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(h.grad == 0) and torch.all(w.grad == 0)


def test_second_backward_is_refused() -> None:
    h, w, targets = make_case(6, 16, 40, torch.float32, seed=6)
    loss = linear_cross_entropy(h, w, targets, use_triton=False)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_autocast_casts_like_f_linear() -> None:
    """Under bf16 autocast the matmuls run in bf16, the loss is fp32 and the fp32 weight gets an fp32 grad."""
    h, w, targets = make_case(16, 32, 100, torch.float32, seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, targets, chunk_tokens=8, block_vocab=64)
    loss.backward()
    h64, w64 = leaf64(h), leaf64(w)
    ref.linear_cross_entropy(h64, w64, targets).backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert_close(w.grad, w64.grad, torch.bfloat16, "d weight under autocast")


def test_default_chunk_keeps_one_chunk_near_the_hidden_size() -> None:
    assert default_chunk_tokens(16384, 2048, 128256) == 512       # llama-1b micro-batch: 512 x 128256 logits
    assert default_chunk_tokens(2048, 512, 128256) == 256        # floor: thin chunks re-read the weight too often
    assert default_chunk_tokens(100, 512, 128256) == 100         # never more than the tokens


def _peak_cpu_bytes(fn) -> int:
    """Peak of live CPU allocator bytes while ``fn`` runs, from torch.profiler's memory events.

    With ``profile_memory=True`` the profiler records every CPU allocation and free as a
    ``[memory]`` event with a signed byte count; replaying them in time order gives the live
    bytes after each event, and the maximum is the peak above what was live before ``fn``.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.slow
def test_fused_peak_memory_is_a_quarter_of_naive() -> None:
    """tokens=2048, hidden=512, vocab=128256, fp32 on CPU: forward + backward peak, fused <= 0.25x naive.

    The fused path runs its torch chunk pass (the Triton pass computes the same thing in the same
    buffer; the memory saving comes from the chunking, which is shared). Gradients land in .grad
    (both paths allocate the same 2048x512 + 128256x512 fp32 grads, counted in both peaks).
    """
    torch.manual_seed(0)
    tokens, dim, vocab = 2048, 512, 128256
    h = torch.randn(tokens, dim, requires_grad=True)
    w = (0.02 * torch.randn(vocab, dim)).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,))
    targets[:64] = IGNORE

    def run(fused: bool) -> float:
        h.grad = w.grad = None
        if fused:
            loss = linear_cross_entropy(h, w, targets, use_triton=False)
        else:
            loss = ref.linear_cross_entropy(h, w, targets)
        loss.backward()
        return loss.item()

    peaks: dict[bool, int] = {}
    losses: dict[bool, float] = {}
    for fused in (True, False):
        peaks[fused] = _peak_cpu_bytes(lambda fused=fused: losses.__setitem__(fused, run(fused)))
    logits_bytes = tokens * vocab * 4
    assert peaks[False] >= 2 * logits_bytes  # sanity: the naive path really holds the logits (and more)
    ratio = peaks[True] / peaks[False]
    print(f"peak fused {peaks[True] / 2**20:.0f} MiB, naive {peaks[False] / 2**20:.0f} MiB, ratio {ratio:.3f}")
    assert ratio <= 0.25, f"fused peak {peaks[True]} B is {ratio:.2f}x the naive {peaks[False]} B"
    assert abs(losses[True] - losses[False]) <= 1e-5 * abs(losses[False])
