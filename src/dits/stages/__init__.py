"""The stages of a run, one module each: ``sft_data``, ``search``, ``influence``, ``select``, ``train``
(sft and dpo), ``evaluate``.

Each is a function ``(StageContext, its inputs) -> its outputs`` (:mod:`dits.stages.context`): it names
what its output depends on, runs through the one skip / resume / refuse rule of :mod:`dits.artifacts`, and
reads and writes only the records of :mod:`dits.records`. The pipeline (:mod:`dits.pipeline`) and the
single-stage commands (:mod:`dits.cli`) call the same functions. Nothing below ``stages`` imports them.
"""
