"""The GPU path's precision, checked on the CPU: bf16 base weights, float32 LoRA weights and gradients,
float32 features under bf16 autocast, close to the float32 model's."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from llm_attribution.data.templates import PromptSettings
from llm_attribution.features.gradients import GradientSettings, collect_features
from llm_attribution.models.device import autocast, base_dtype
from llm_attribution.models.lora import attach_lora, lora_parameters
from llm_attribution.models.resolve import load_model
from llm_attribution.models.settings import LoraSettings, ModelSettings
from tests.helpers import run_cli, tiny_run_args, toy_task

PROMPT = PromptSettings(max_length=48)


def _adapted(dtype: str):
    loaded = load_model(ModelSettings(model="tiny", device="cpu", dtype=dtype))
    torch.manual_seed(0)
    model = attach_lora(loaded.model, LoraSettings())
    with torch.no_grad():
        for param in lora_parameters(model).values():
            param.normal_(0, 0.05, generator=torch.Generator().manual_seed(param.numel()))
    return model, loaded.tokenizer


def test_bf16_base_keeps_lora_in_float32_and_autocasts() -> None:
    model, _ = _adapted("bfloat16")
    lora = {n: p.dtype for n, p in model.named_parameters() if "lora_" in n}
    base = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    assert lora and set(lora.values()) == {torch.float32}
    assert base == {torch.bfloat16} and base_dtype(model) == torch.bfloat16
    with autocast(model):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    float_model, _ = _adapted("float32")
    with autocast(float_model):
        assert not torch.is_autocast_enabled("cpu")


def test_bf16_features_are_float32_and_match_the_float32_model() -> None:
    examples = toy_task().train[:8]
    features = {}
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = _adapted(dtype)
        features[dtype] = collect_features(model, tokenizer, examples, PROMPT, GradientSettings())
        for param in lora_parameters(model).values():
            assert param.grad is None or param.grad.dtype == torch.float32
    low, full = features["bfloat16"], features["float32"]
    assert low.losses.dtype == torch.float32 and low.representations.dtype == torch.float32
    for name, block in low.blocks.items():
        assert block.dtype == torch.float32 and torch.isfinite(block).all()
        # bf16 keeps ~3 significant digits, so each example's gradient stays within a small angle of the
        # float32 model's (cosine >= 0.9998 seen on this model)
        cosine = torch.nn.functional.cosine_similarity(block, full.blocks[name], dim=1)
        assert float(cosine.min()) > 0.99, name
        assert not torch.equal(block, full.blocks[name])  # it really ran in bf16


def test_a_bf16_run_on_the_cpu_works_end_to_end(tmp_path, capsys) -> None:
    run = tmp_path / "bf16"
    argv = ["run", *tiny_run_args(train=24, test=4, epochs=1), "--dtype", "bfloat16"]
    code, _, err = run_cli([*argv, "--methods", "hessian-free,exact,repsim", "--out", str(run)], capsys)
    assert code == 0, err
    adapter = load_file(run / "adapters" / "epoch-1" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    results = json.loads((run / "results.json").read_text())
    for row in results["methods"].values():
        scores = load_file(run / row["scores"])["scores"]
        assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
