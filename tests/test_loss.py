"""chunked_cross_entropy: the same loss and gradients as F.cross_entropy on fp32 logits, and a loss
step that never holds an fp32 copy of all the logits."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparselm.models.loss import chunked_cross_entropy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from memtrack import LiveTensorBytes  # noqa: E402

B, T, V = 3, 16, 128  # 48 rows


def reference(logits, targets, vocab_size, reduction):
    """The old path: the real-vocabulary logits upcast to fp32 whole, then F.cross_entropy."""
    v = vocab_size or logits.size(-1)
    return F.cross_entropy(logits[..., :v].float().reshape(-1, v), targets.reshape(-1), reduction=reduction)


def make(dtype=torch.float32, vocab_size=None, ignored=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, T, V, generator=g)
    if vocab_size:
        logits[..., vocab_size:] = 50.0  # padding columns with huge logits: they must not count
    targets = torch.randint(0, vocab_size or V, (B, T), generator=g)
    if ignored:
        targets[0, :5] = -100
        targets[2, 9:] = -100
    return logits.to(dtype), targets


def loss_and_grad(fn, logits, targets, *args, **kwargs):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, targets, *args, **kwargs)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [0, 7, 16, 1000], ids=["one-chunk", "7-not-dividing", "16-dividing", "larger"])
@pytest.mark.parametrize("vocab_size", [None, 100], ids=["full-vocab", "padded-vocab"])
def test_equals_cross_entropy_on_fp32_logits(vocab_size, chunk, reduction):
    logits, targets = make(vocab_size=vocab_size)
    want, want_grad = loss_and_grad(reference, logits, targets, vocab_size, reduction)
    got, grad = loss_and_grad(chunked_cross_entropy, logits, targets, vocab_size, chunk=chunk, reduction=reduction)
    assert got.dtype == torch.float32 and grad.dtype == torch.float32 and grad.shape == logits.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-5)
    assert (grad[targets == -100] == 0).all()  # ignored rows: no gradient
    if vocab_size:
        assert (grad[..., vocab_size:] == 0).all()  # padding columns: no gradient
        assert got.item() < (20 if reduction == "mean" else 20 * B * T)  # the huge padding logits did not count
    with torch.no_grad():  # evaluation: the forward-only path, no gradient buffer
        torch.testing.assert_close(chunked_cross_entropy(logits, targets, vocab_size, chunk=chunk, reduction=reduction),
                                   want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, 7])
@pytest.mark.parametrize("vocab_size", [None, 100], ids=["full-vocab", "padded-vocab"])
def test_bf16_logits_equal_fp32_cross_entropy_on_the_same_values(vocab_size, chunk):
    logits, targets = make(torch.bfloat16, vocab_size)
    # the loss: the per-chunk upcast is exact, so it is fp32 cross-entropy of the same bf16 values
    want, want_grad = loss_and_grad(reference, logits.float(), targets, vocab_size, "mean")
    got, grad = loss_and_grad(chunked_cross_entropy, logits, targets, vocab_size, chunk=chunk)
    assert got.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the gradient is the fp32 one rounded once to bf16 (stored in the logits' dtype), as autograd
    # gives the old path through logits.float(): equal up to that rounding (2**-8 relative)
    torch.testing.assert_close(grad.float(), want_grad, rtol=2 ** -8, atol=1e-5)
    _, old_grad = loss_and_grad(reference, logits, targets, vocab_size, "mean")
    assert old_grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, old_grad, rtol=2 ** -8, atol=1e-5)


def test_all_targets_ignored_as_cross_entropy():
    logits, targets = make()
    targets[:] = -100
    loss, grad = loss_and_grad(chunked_cross_entropy, logits, targets, chunk=7)
    assert torch.isnan(loss) and (grad == 0).all()  # F.cross_entropy: nan mean, zero gradient
    loss, grad = loss_and_grad(chunked_cross_entropy, logits, targets, chunk=7, reduction="sum")
    assert loss.item() == 0 and (grad == 0).all()
    assert torch.isnan(reference(logits, targets, None, "mean"))


def test_under_autocast_and_scaled_backward():
    """bf16 logits from an autocast matmul; the loss scaled (as grad accumulation does) before backward."""
    g = torch.Generator().manual_seed(1)
    h, w0 = torch.randn(B, T, 32, generator=g), torch.randn(32, V, generator=g) / 4
    targets = make(vocab_size=100)[1]
    grads = []
    for fn in (reference, lambda x, y, v, r: chunked_cross_entropy(x, y, v, chunk=5, reduction=r)):
        w = w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = h @ w
            assert logits.dtype == torch.bfloat16
            loss = fn(logits, targets, 100, "mean")
        (loss / 4).backward()
        grads.append((loss.detach(), w.grad))
    (want, want_grad), (got, grad) = grads
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-2, atol=1e-4)  # bf16 matmul of bf16-rounded gradients


def test_under_torch_compile():
    logits, targets = make(vocab_size=100)
    want, want_grad = loss_and_grad(chunked_cross_entropy, logits, targets, 100, chunk=7)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, y: chunked_cross_entropy(x * 1.0, y, 100, chunk=7), backend="aot_eager")
    got, grad = loss_and_grad(compiled, logits, targets)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-6)


def test_refuses_what_it_does_not_do():
    logits, targets = make()
    with pytest.raises(ValueError, match="reduction"):
        chunked_cross_entropy(logits, targets, reduction="none")
    with pytest.raises(ValueError, match="do not match"):
        chunked_cross_entropy(logits, targets[:, :-1])
    x = logits.clone().requires_grad_()
    loss = chunked_cross_entropy(x, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):  # the stored gradient was handed over in place
        loss.backward()


def test_tracker_counts_live_storages_once():
    with LiveTensorBytes() as mem:
        a = torch.empty(1000)  # 4000 bytes
        b = a[10:].view(-1, 10)  # views: no new memory
        a.add_(1).float()  # in place, and .float() of fp32: no new memory
        c = torch.empty(500, dtype=torch.bfloat16)  # 1000 bytes
        assert mem.current == 5000
        del a, b
        assert mem.current == 1000
        d = torch.empty(250)  # 1000 bytes
        del c, d
    assert mem.peak == 5000 and mem.current == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_loss_step_peak_memory_drops(dtype):
    """Forward + backward of the loss on 4x256 tokens x 8192 columns (8000 real), chunk 256 tokens."""
    n_tokens, cols, vocab, chunk = 4 * 256, 8192, 8000, 256
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 256, cols, generator=g).to(dtype)
    targets = torch.randint(0, vocab, (4, 256), generator=g)
    peaks = {}
    for name, fn in (("F.cross_entropy(fp32 copy)", lambda x: reference(x, targets, vocab, "mean")),
                     ("chunked_cross_entropy", lambda x: chunked_cross_entropy(x, targets, vocab, chunk=chunk))):
        x = logits.clone().requires_grad_()
        with LiveTensorBytes() as mem:
            fn(x).backward()
        peaks[name] = mem.peak
        del x
    fp32_copy = n_tokens * vocab * 4
    grad_bytes = n_tokens * cols * logits.element_size()
    fp32_chunk = chunk * vocab * 4
    print(f"\nloss step peak, {n_tokens} tokens x {cols} columns {str(dtype)[6:]} (logits {grad_bytes / 2**20:.1f} MiB, "
          f"fp32 copy {fp32_copy / 2**20:.1f} MiB): " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in peaks.items()))
    old, new = peaks["F.cross_entropy(fp32 copy)"], peaks["chunked_cross_entropy"]
    assert new <= old - fp32_copy  # at least one fp32 copy of the logits less
    assert new <= grad_bytes + fp32_chunk + 2**20  # the gradient in the logits' dtype, one fp32 chunk, small change
