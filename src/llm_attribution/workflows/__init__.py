"""The only code that reads or writes a run folder (:mod:`.layout` names its files): fine-tune or open a
run, attribute it, run the study grid, explain one answer, the run-level diagnostics, and the report."""
