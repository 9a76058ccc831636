"""hrpo.cpu_logprob against a direct log-softmax over the full logits (values and gradients)."""
import pytest
import torch

from hrpo import cpu_logprob


def reference(hidden, weight, bias, targets, temperature, softcap, scale):
    logits = (hidden @ weight.t() + bias) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    p = log_p.exp()
    return (log_p.gather(-1, targets[:, None])[:, 0], -(p * log_p).sum(-1), torch.log((p * p).sum(-1)),
            (logits / temperature).mean(-1), logits.argmax(-1) == targets)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_values_and_gradients_match_a_full_log_softmax(monkeypatch, softcap):
    monkeypatch.setattr(cpu_logprob, "ROW_ELEMENTS", 3 * 50)  # blocks of 3 rows: 7 rows in 3 blocks
    torch.manual_seed(0)
    hidden = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64)
    targets = torch.randint(0, 50, (7,))
    ours = cpu_logprob.chunked_log_probs(hidden, weight, bias, targets, 0.7, 16, softcap, 1.3,
                                         outputs=cpu_logprob.OUTPUT_NAMES[1:])
    want = reference(hidden, weight, bias, targets, 0.7, softcap, 1.3)
    for name, a, b in zip(cpu_logprob.OUTPUT_NAMES, ours, want):
        assert torch.allclose(a.double() if a.is_floating_point() else a, b.detach() if b.is_floating_point() else b,
                              atol=1e-6), name
    (ours[0].sum() + ours[1].sum()).backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (want[0].sum() + want[1].sum()).backward()
    assert torch.allclose(got[0], hidden.grad, atol=1e-5) and torch.allclose(got[1], weight.grad, atol=1e-5)


def test_only_the_asked_outputs_an_empty_batch_and_autocast():
    hidden, weight = torch.randn(0, 8), torch.randn(20, 8)
    out = cpu_logprob.chunked_log_probs(hidden, weight, None, torch.zeros(0, dtype=torch.long), 1.0, 16,
                                        outputs=("entropy",))
    assert out[0].shape == (0,) and out[1].shape == (0,) and out[2:] == (None, None, None)
    hidden, targets = torch.randn(4, 8), torch.randint(0, 20, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_p = cpu_logprob.chunked_log_probs(hidden, weight, None, targets, 1.0, 16, outputs=())[0]
    assert log_p.dtype == torch.float32
    assert torch.allclose(log_p, torch.log_softmax(hidden @ weight.t(), -1).gather(-1, targets[:, None])[:, 0],
                          atol=1e-5)


def test_the_dispatch_keeps_the_kernel_on_cuda_and_routes_the_cpu_here():
    class Kernel:
        @staticmethod
        def apply(hidden, *args, **kwargs):
            return "kernel"

    dispatch = cpu_logprob.DeviceDispatch(Kernel)
    hidden, weight = torch.randn(2, 4), torch.randn(6, 4)
    assert dispatch.apply(hidden, weight, None, torch.tensor([1, 2]), 1.0, 16)[0].shape == (2,)
    cuda_like = type("T", (), {"device": torch.device("cuda")})()
    assert dispatch.apply(cuda_like) == "kernel"
