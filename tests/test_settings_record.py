"""Options added after runs were made are recorded only away from their default, so the settings and the
feature keys of a run made before them still match a rerun at the default."""

from __future__ import annotations

from llm_attribution.core.settings import from_dict, to_dict
from llm_attribution.data.templates import PromptSettings
from llm_attribution.models.settings import LoraSettings

BEFORE_PADDING = {"template": "study", "max_length": 128, "loss_on": "all"}  # a record made before padding
BEFORE_TUNING = {"lora_r": 4, "lora_alpha": 32, "lora_dropout": 0.1, "lora_targets": ["q_proj", "v_proj"]}


def test_late_options_at_their_default_leave_the_record_as_it_was() -> None:
    assert to_dict(PromptSettings()) == BEFORE_PADDING
    assert to_dict(LoraSettings()) == BEFORE_TUNING
    assert from_dict(PromptSettings, BEFORE_PADDING) == PromptSettings()


def test_late_options_away_from_their_default_are_recorded() -> None:
    assert to_dict(PromptSettings(padding="study"))["padding"] == "study"
    recorded = to_dict(LoraSettings(tuning="full", full_targets=("q_proj",)))
    assert recorded["tuning"] == "full" and recorded["full_targets"] == ["q_proj"]
    assert from_dict(LoraSettings, recorded) == LoraSettings(tuning="full", full_targets=("q_proj",))
