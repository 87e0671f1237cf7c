"""Adapters a user brings: LoRA variants whose trained weights are LoRA matrices are attributed (rsLoRA,
with its scaling); tuners that train other weights (DoRA, IA3, prompt tuning, modules_to_save) are refused
in one line that says what is supported, and nothing of a run is left behind; the run records the
adapter's config."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model

from llm_attribution.models.lora import adapter_update_norms
from llm_attribution.models.resolve import load_model
from llm_attribution.models.settings import ModelSettings
from tests.helpers import run_cli, tiny_run_args


def _save(config, folder: Path, randomise: bool = True) -> Path:  # type: ignore[no-untyped-def]
    """A tiny base with ``config`` attached, its LoRA B matrices random (so every update is non-zero)."""
    # the user's own code, not a command of ours: no log line may reach the error stream the test reads
    # (an earlier command's log handler may still point at a closed one)
    logging.disable(logging.CRITICAL)
    try:
        loaded = load_model(ModelSettings(model="tiny", device="cpu"))
    finally:
        logging.disable(logging.NOTSET)
    model = get_peft_model(loaded.model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if randomise and "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(str(folder))
    return folder


def _run(adapter: Path, out: Path, capsys) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    argv = ["run", *tiny_run_args(train=12, test=2), "--methods", "hessian-free", "--adapter", str(adapter)]
    return run_cli([*argv, "--out", str(out)], capsys)


LORA = {"target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
REFUSED = {
    "DoRA": (LoraConfig(r=4, lora_alpha=8, use_dora=True, **LORA), "DoRA adapter (use_dora)"),
    "IA3": (
        IA3Config(
            target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
        ),
        "is a IA3 adapter",
    ),
    "prompt tuning": (
        PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        "PROMPT_TUNING adapter",
    ),
    "modules_to_save": (
        LoraConfig(r=4, lora_alpha=8, modules_to_save=["lm_head"], **LORA),
        "modules_to_save: lm_head",
    ),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_an_adapter_training_other_weights_is_refused_in_one_line(kind, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    config, says = REFUSED[kind]
    adapter = _save(config, tmp_path / "adapter", randomise=False)
    code, _, err = _run(adapter, tmp_path / "run", capsys)
    assert code == 2, err
    assert says in err and "supported: peft LoRA adapters" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing partial left behind


def test_rslora_is_attributed_with_its_scaling_recorded(tmp_path, capsys) -> None:
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"v_proj": 2}, **LORA)
    adapter = _save(config, tmp_path / "adapter")
    code, _, err = _run(adapter, tmp_path / "run", capsys)
    assert code == 0, err
    recorded = json.loads((tmp_path / "run" / "settings.json").read_text())["adapter"]["config"]
    assert recorded["use_rslora"] is True and recorded["r"] == 4 and recorded["peft_type"] == "LORA"
    assert recorded["target_modules"] == ["q_proj", "v_proj"]

    # the update norms equal peft's own delta weights (alpha / sqrt(r), v_proj with its own alpha)
    loaded = load_model(ModelSettings(model="tiny", device="cpu"))
    from peft import PeftModel

    model = PeftModel.from_pretrained(loaded.model, str(adapter))
    norms = adapter_update_norms(adapter)
    expected = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "lora_A") and "default" in module.lora_A:
            short = name.removeprefix("base_model.model.").removeprefix("model.")
            expected[short] = float(torch.linalg.matrix_norm(module.get_delta_weight("default").double()))
    assert set(norms) == set(expected) and len(norms) == 4
    for name, value in expected.items():
        assert norms[name] == pytest.approx(value, rel=1e-5), name
    assert any("v_proj" in n for n in norms)  # the pattern's module is among them, with alpha 2
