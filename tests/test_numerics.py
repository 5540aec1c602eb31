"""Numerics as the official code: fp32 matcher costs under AMP, fp32 evaluation by default, and DDP without the
unused-parameter search where every parameter gets a gradient."""
import pytest
import torch

from conftest import REPO

QUICK = REPO / "configs" / "quick_schedules" / "fastinst_R50_quick.yaml"


def tiny_fastinst(*opts):
    from instsynth.config import load_config
    from instsynth.modeling import build_model

    torch.manual_seed(0)
    return build_model(load_config(QUICK, list(opts)))


def batch(train: bool, n: int = 2):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        masks = torch.zeros(3, 128, 256, dtype=torch.bool)
        masks[0, 10:60, 20:90] = masks[1, 70:120, 100:200] = masks[2, 5:40, 150:250] = True
        x = {"image": torch.randint(0, 256, (3, 128, 256), dtype=torch.uint8, generator=g), "height": 128, "width": 256}
        if train:
            x["instances"] = {"gt_classes": torch.tensor([0, 2, 5]), "gt_masks": masks}
        out.append(x)
    return out


def test_matcher_costs_are_fp32_under_fp16_autocast_where_plain_fp16_overflows():
    from instsynth.modeling.fastinst.criterion import HungarianMatcher, pair_bce_cost

    torch.manual_seed(0)
    q, points = 12, 12544  # the configs' TRAIN_NUM_POINTS
    logits, masks, locations = torch.randn(q, 9), torch.randn(q, 128, 128) * 30, torch.rand(q, 2)
    labels, gt = torch.tensor([0, 2, 5]), torch.rand(3, 128, 256) > 0.5
    coords = torch.rand(1, points, 2)
    matcher = HungarianMatcher(2.0, 5.0, 5.0, 1000.0, points)
    reference = matcher.cost_matrix(logits, masks, locations, labels, gt, coords)
    with torch.autocast("cpu", dtype=torch.float16):
        under_amp = matcher.cost_matrix(logits, masks, locations, labels, gt, coords)
        plain = pair_bce_cost(masks.flatten(1)[:, :points], gt.flatten(1)[:, :points].float())
    assert under_amp.dtype == torch.float32 and torch.isfinite(under_amp).all()
    torch.testing.assert_close(under_amp, reference, rtol=0, atol=0)
    assert plain.dtype == torch.float16 and torch.isinf(plain).any()  # what fp16 matching costs would be

    targets = [{"labels": labels, "masks": gt}]
    torch.manual_seed(1)
    expected = matcher(logits[None], masks[None], locations[None], targets)
    with torch.autocast("cpu", dtype=torch.float16):
        torch.manual_seed(1)
        got = matcher(logits[None], masks[None], locations[None], targets)
    assert all(torch.equal(a, b) for a, b in zip(expected[0], got[0]))


def test_evaluation_is_fp32_by_default_even_under_accelerate_mixed_precision():
    """accelerate wraps ``forward`` in autocast when it prepares a model for mixed precision; evaluation
    bypasses that wrapper unless TEST.AMP.ENABLED."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from instsynth.config import load_config
    from instsynth.engine.trainer import eval_forward

    assert load_config(None).TEST.AMP.ENABLED is False
    images = batch(train=False, n=1)
    fp32 = tiny_fastinst().eval()
    try:
        with torch.no_grad():
            expected = fp32(images)[0]["instances"]
            prepared = Accelerator(cpu=True, mixed_precision="bf16").prepare(tiny_fastinst().eval())
            wrapped = prepared(images)[0]["instances"]  # accelerate's bf16 autocast wrapper
            plain = eval_forward(prepared, images)[0]["instances"]
            amp = eval_forward(prepared, images, amp=True)[0]["instances"]
    finally:
        AcceleratorState._reset_state(True)  # the state is a process-wide singleton: leave none behind
    assert not torch.equal(wrapped["scores"], expected["scores"])
    assert torch.equal(plain["pred_masks"], expected["pred_masks"])
    torch.testing.assert_close(plain["scores"], expected["scores"], rtol=0, atol=0)
    assert not torch.equal(amp["scores"], expected["scores"])


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_every_parameter_gets_gradient_is_what_ddp_is_told(deep_supervision):
    from instsynth.config import load_config
    from instsynth.engine.trainer import make_accelerator, set_find_unused_parameters

    model = tiny_fastinst("MODEL.FASTINST.DEEP_SUPERVISION", str(deep_supervision)).train()
    sum(model(batch(train=True)).values()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert model.every_parameter_gets_gradient == (not unused) == deep_supervision, unused
    accelerator = make_accelerator(load_config(QUICK))
    assert set_find_unused_parameters(accelerator, model) is (not deep_supervision)
    assert accelerator.ddp_handler.find_unused_parameters is (not deep_supervision)


def test_inference_benchmark_times_both_models_with_the_official_protocol(capsys):
    """benchmarks/bench_inference.py in its test size: tiny models, 64x128, 1 warm-up + 2 timed images."""
    import runpy

    bench = runpy.run_path(str(REPO / "benchmarks" / "bench_inference.py"))
    rows = bench["main"](bench["parse_args"](["--device", "cpu", "--tiny", "--size", "64x128", "--images", "3",
                                              "--warmup", "1"]))
    assert [(r["model"], r["precision"]) for r in rows] == [("FastInst-D3-R50", "fp32"), ("FastInst-D3-R50", "amp"),
                                                          ("OneFormer-R50", "fp32"), ("OneFormer-R50", "amp")]
    assert all(r["images"] == 2 and r["warmup"] == 1 and r["fps"] > 0 for r in rows)
    for r in rows:
        assert abs(r["fps"] * r["ms"] - 1000) < 1e-6 * r["fps"] * r["ms"]
    out = capsys.readouterr().out
    assert "vs OneFormer fp32" in out and "1.00x" in out and "64x128" in out
