"""make_optimizer picks AdamW's fused kernel where every parameter allows it; resume keeps working with it."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

from kt_train.checkpoint import with_current_kernel
from kt_train.loop import make_optimizer


def fake_run(*modules: torch.nn.Module) -> SimpleNamespace:
    """What make_optimizer reads of a Run: the students, the method's heads, the config, the loader's length."""
    config = SimpleNamespace(lr=1e-3, weight_decay=0.05, warmup_epochs=0, amp=False)
    return SimpleNamespace(students=list(modules[:1]), method=torch.nn.ModuleList(modules[1:]), config=config,
                           loader=[None] * 3, device=torch.device("cpu"))


def modules(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)


def step(optimizer: torch.optim.Optimizer, student: torch.nn.Module, head: torch.nn.Module, x: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    head(student(x)).square().sum().backward()
    optimizer.step()


def test_cpu_parameters_get_the_fused_kernel():
    optimizer = make_optimizer(fake_run(*modules()), steps=3)[0]
    assert optimizer.defaults["fused"] is True
    assert all(g["fused"] is True for g in optimizer.param_groups)


def test_a_parameter_on_another_device_falls_back_to_the_default():
    student, head = modules()
    optimizer = make_optimizer(fake_run(student, head.to("meta")), steps=3)[0]
    assert not optimizer.defaults["fused"]


def test_fused_resume_matches_an_uninterrupted_run():
    x = torch.randn(5, 4)
    straight = modules()
    opt = make_optimizer(fake_run(*straight), steps=3)[0]
    for _ in range(3):
        step(opt, *straight, x)
    first = modules()
    opt = make_optimizer(fake_run(*first), steps=3)[0]
    step(opt, *first, x)
    saved = torch.load(save_to_buffer({"optimizer": opt.state_dict(), "weights": [m.state_dict() for m in first]}),
                       map_location="cpu", weights_only=True)
    resumed = modules(seed=1)                      # other weights: the checkpoint must restore everything
    for module, weights in zip(resumed, saved["weights"]):
        module.load_state_dict(weights)
    opt = make_optimizer(fake_run(*resumed), steps=3)[0]
    opt.load_state_dict(with_current_kernel(saved["optimizer"], opt))
    for _ in range(2):
        step(opt, *resumed, x)
    for a, b in zip(straight, resumed):
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)


def test_an_unfused_checkpoint_resumes_fused():
    """A run saved before AdamW was fused: torch alone would resume it with the checkpoint's (unfused) kernel."""
    x = torch.randn(5, 4)
    old = modules()
    opt = torch.optim.AdamW([p for m in old for p in m.parameters()], lr=1e-3, weight_decay=0.05)
    step(opt, *old, x)
    opt_new = make_optimizer(fake_run(*old), steps=3)[0]
    opt_new.load_state_dict(with_current_kernel(opt.state_dict(), opt_new))
    assert all(g["fused"] is True for g in opt_new.param_groups)
    steps = [s["step"] for s in opt_new.state.values()]
    assert all(s.dtype == torch.float32 and float(s) == 1.0 for s in steps)
    step(opt_new, *old, x)
    assert all(float(s["step"]) == 2.0 for s in opt_new.state.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fused_with_grad_scaler_clip_and_resume():
    """train_step's order on a GPU: scale, backward, unscale_, clip, scaler.step; then resume from a CPU copy."""
    student, head = (m.cuda() for m in modules())
    run = fake_run(student, head)
    run.device, run.config.amp = torch.device("cuda"), True
    optimizer, _, scaler = make_optimizer(run, steps=3)
    assert optimizer.defaults["fused"] is True and scaler.is_enabled()
    x = torch.randn(5, 4, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = head(student(x)).float().square().sum()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(list(student.parameters()) + list(head.parameters()), 1.0)
    scaler.step(optimizer)
    scaler.update()
    saved = torch.load(save_to_buffer(optimizer.state_dict()), map_location="cpu", weights_only=True)
    again = make_optimizer(run, steps=3)[0]
    again.load_state_dict(with_current_kernel(saved, again))
    assert all(s["step"].device.type == "cuda" for s in again.state.values())
    step(again, student, head, x)
    assert all(torch.isfinite(p).all() for p in student.parameters())


def save_to_buffer(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer
