"""The quickstart trains what a user gets: the library's defaults, on a time budget."""

from __future__ import annotations

from vtfuse.config import ModelConfig, TrainConfig
from vtfuse.quickstart import QuickstartPlan, Stage


def test_every_stage_is_the_library_defaults_on_a_time_budget():
    plan = QuickstartPlan()
    stages = [plan.caption, plan.vqa, plan.retrieval, plan.classify]
    assert all(isinstance(stage, Stage) for stage in stages)
    for stage in stages:
        assert stage.model == ModelConfig(task=stage.model.task)
        assert stage.train == TrainConfig(max_minutes=stage.train.max_minutes)
        assert stage.train.on_the_clock
