"""Adapters a user brings: LoRA variants are attributed (rsLoRA, with its scaling; modules_to_save, whose
trained modules are loaded and the LoRA matrices attributed; one adapter by name among several in a
folder); tuners that train other weights (DoRA, IA3, prompt tuning) are refused in one line that says what
is supported, and nothing of a run is left behind; the run records the adapter's config."""

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


def _brute_force_dot(model, examples, test) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Per-example LoRA gradient dot products, one backward per example (Hessian-free by hand)."""
    from llm_attribution.data.templates import PromptSettings, collate, encode_examples
    from llm_attribution.features.gradients import per_example_losses
    from llm_attribution.models.lora import lora_parameters
    from llm_attribution.models.tiny import byte_tokenizer

    tokenizer, params = byte_tokenizer(), None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    params = list(lora_parameters(model).values())

    def gradients(rows):  # type: ignore[no-untyped-def]
        out = []
        for enc in encode_examples(rows, tokenizer, PromptSettings()):
            batch = collate([enc], tokenizer.pad_token_id)
            labels = batch.pop("labels")
            loss, _ = per_example_losses(model(**batch).logits, labels)
            out.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss.sum(), params)]))
        return torch.stack(out).double()

    return gradients(test) @ gradients(examples).T


def test_modules_to_save_are_loaded_and_the_lora_matrices_attributed(tmp_path, capsys) -> None:
    from peft import PeftModel

    from llm_attribution.evaluation.score_files import read_scores
    from llm_attribution.workflows.runs import open_run

    config = LoraConfig(r=4, lora_alpha=8, modules_to_save=["lm_head"], **LORA)
    adapter = _save(config, tmp_path / "adapter")
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["lm_head"]
    # the user's trained copy of lm_head differs from the base's, so its loading shows in the scores
    weights = __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(adapter / "adapter_model.safetensors")
    )
    head = next(k for k in weights if "lm_head" in k)
    weights[head] = weights[head] + 0.5 * torch.randn(
        weights[head].shape, generator=torch.Generator().manual_seed(1)
    )
    __import__("safetensors.torch", fromlist=["save_file"]).save_file(
        weights, str(adapter / "adapter_model.safetensors")
    )

    code, _, err = _run(adapter, tmp_path / "run", capsys)
    assert code == 0, err
    recorded = json.loads((tmp_path / "run" / "settings.json").read_text())["adapter"]["config"]
    assert recorded["modules_to_save"] == ["lm_head"]
    task = open_run(tmp_path / "run").task
    scores = read_scores(tmp_path / "run" / "scores" / "hessian-free.safetensors").double()

    base = load_model(ModelSettings(model="tiny", device="cpu")).model
    expected = _brute_force_dot(PeftModel.from_pretrained(base, str(adapter)), task.train, task.test)
    assert float((scores - expected).norm() / expected.norm()) < 1e-4
    plain = load_model(ModelSettings(model="tiny", device="cpu")).model  # the same LoRA, the base's lm_head
    lora_only = LoraConfig(r=4, lora_alpha=8, **LORA)
    model = get_peft_model(plain, lora_only)
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, {k: v for k, v in weights.items() if "lora_" in k})
    without = _brute_force_dot(model, task.train, task.test)
    assert float((scores - without).norm() / without.norm()) > 1e-2  # the trained lm_head was in the forward


def test_one_adapter_by_name_among_several_in_a_folder(tmp_path, capsys) -> None:
    from llm_attribution.evaluation.score_files import read_scores

    loaded = load_model(ModelSettings(model="tiny", device="cpu"))
    model = get_peft_model(loaded.model, LoraConfig(r=4, lora_alpha=8, **LORA))
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, **LORA))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    folder = tmp_path / "adapters"
    model.save_pretrained(str(folder))  # the default adapter in the folder, "second" in folder/second
    assert (folder / "second" / "adapter_config.json").is_file()

    argv = ["run", *tiny_run_args(train=12, test=2), "--methods", "hessian-free", "--adapter", str(folder)]
    code, _, err = run_cli([*argv, "--adapter-name", "second", "--out", str(tmp_path / "second")], capsys)
    assert code == 0, err
    recorded = json.loads((tmp_path / "second" / "settings.json").read_text())["adapter"]
    assert recorded["path"].endswith("second") and recorded["config"]["r"] == 2
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "default")], capsys)
    assert code == 0, err
    first = read_scores(tmp_path / "default" / "scores" / "hessian-free.safetensors")
    second = read_scores(tmp_path / "second" / "scores" / "hessian-free.safetensors")
    assert not torch.allclose(first, second)

    code, _, err = run_cli([*argv, "--adapter-name", "third", "--out", str(tmp_path / "third")], capsys)
    assert code == 2 and "no adapter named 'third' (it has: second)" in err
    only_named = tmp_path / "named"
    model.save_pretrained(str(only_named), selected_adapters=["second"])
    argv[-1] = str(only_named)
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "none")], capsys)
    assert code == 2 and "holds adapters by name (second): pick one with --adapter-name" in err
    assert not (tmp_path / "none").exists() and not (tmp_path / "third").exists()
