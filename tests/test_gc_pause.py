"""The cyclic GC is paused while an engine loop runs and restored afterwards."""
from __future__ import annotations

import gc

import pytest

from atom_rollout import SamplingParams
from atom_rollout.engine.gc_pause import cyclic_gc_paused


@pytest.fixture
def gc_enabled():
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def test_generate_batch_runs_with_the_collector_paused(llama_engine, gc_enabled, monkeypatch):
    seen = []
    step = llama_engine.core.step
    monkeypatch.setattr(llama_engine.core, "step", lambda: (seen.append(gc.isenabled()), step())[1])
    llama_engine.generate_batch([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0))
    assert seen and not any(seen)
    assert gc.isenabled()


def test_a_collector_the_caller_disabled_stays_disabled(llama_engine, gc_enabled):
    gc.disable()
    llama_engine.generate_batch([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0))
    assert not gc.isenabled()


def test_nested_pauses_resume_at_the_outermost_exit_and_after_errors(gc_enabled):
    with cyclic_gc_paused():
        with cyclic_gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer loop still runs
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with cyclic_gc_paused():
            raise RuntimeError("step failed")
    assert gc.isenabled()
