"""The `[engine]` section reaches the local model's scheduler field by field (no model is
loaded: `scheduler_config` is the one place the provider builds it)."""

from __future__ import annotations

from pathlib import Path

from modelyard.config import load_config
from modelyard.engine.speculation import SpeculationConfig
from modelyard.providers.local import scheduler_config


def test_every_engine_setting_reaches_the_scheduler(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        "[engine]\nmax_sequences = 3\ncontext_per_sequence = 512\nstep_token_budget = 96\n"
        "max_waiting = 7\nprefix_caching = false\nfair_share = false\nreserved_slots = 2\n"
        "heavy_prefill_per_step = 40\npause_heavy_every = 5\n"
        "interrupt_heavy_steps = false\n", encoding="utf-8")
    speculation = SpeculationConfig(max_draft=5)
    config = scheduler_config(load_config(path, environ={}).engine, speculation)
    assert (config.max_sequences, config.context_per_sequence, config.step_token_budget,
            config.max_waiting) == (3, 512, 96, 7)
    assert config.kv_capacity == 3 * 512   # one slot of context_per_sequence per sequence
    assert config.max_cached_cells == 2 * 512
    assert (config.prefix_caching, config.fair_share, config.interrupt_heavy_steps) == (
        False, False, False)
    assert (config.reserved_slots, config.heavy_prefill_per_step,
            config.pause_heavy_every) == (2, 40, 5)
    assert config.speculation is speculation


def test_the_defaults_interrupt_heavy_steps_and_do_not_speculate() -> None:
    config = scheduler_config(load_config(None, environ={}).engine, None)
    assert config.interrupt_heavy_steps is True and config.speculation is None
    assert config.fair_share is True
