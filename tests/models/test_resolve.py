from __future__ import annotations

import time

import pytest
import torch

from llm_attribution.core.errors import ConfigError, ModelError
from llm_attribution.data.templates import PromptSettings
from llm_attribution.models.generate import generate_answers
from llm_attribution.models.resolve import load_model
from llm_attribution.models.settings import ModelSettings


def test_tiny_is_the_same_network_every_time() -> None:
    a, b = load_model(ModelSettings(model="tiny")), load_model(ModelSettings(model="tiny"))
    for (name, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert a.device.type in ("cpu", "cuda")


def test_local_folder_loads_like_the_original(tmp_path) -> None:
    tiny = load_model(ModelSettings(model="tiny", device="cpu"))
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    again = load_model(ModelSettings(model=str(tmp_path / "m"), device="cpu"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(tiny.model(ids).logits, again.model(ids).logits, atol=1e-6)
    assert again.source.startswith("folder:")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-model", "unknown model"),
        ("./missing/model.gguf", "no such GGUF file"),
    ],
)
def test_unresolvable_models(spec: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        load_model(ModelSettings(model=spec))


def test_fake_gguf_is_a_clear_error(tmp_path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelError, match="cannot load GGUF"):
        load_model(ModelSettings(model=str(fake)))


def test_plain_file_is_not_a_model(tmp_path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelError, match=r"not a \.gguf"):
        load_model(ModelSettings(model=str(path)))


def test_unreachable_hub_id_fails_fast() -> None:
    start = time.perf_counter()
    with pytest.raises(ModelError):
        load_model(ModelSettings(model="llm-attribution-tests/no-such-model-xyz"))
    assert time.perf_counter() - start < 20


def test_bad_model_settings() -> None:
    with pytest.raises(ConfigError):
        ModelSettings(device="tpu")
    with pytest.raises(ConfigError):
        ModelSettings(dtype="int8")


@pytest.mark.embedded
def test_embedded_model_loads_and_generates() -> None:
    loaded = load_model(ModelSettings(model="embedded", device="cpu"))
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.model.config.num_hidden_layers == 30
    assert loaded.tokenizer.eos_token == "<|im_end|>"
    [answer] = generate_answers(
        loaded.model,
        loaded.tokenizer,
        ["What is the capital of France?"],
        PromptSettings(template="chat"),
        max_new_tokens=12,
    )
    assert "Paris" in answer
