"""The data layer: sources -> canonical conversations (checked) -> chat template -> token rows.

sources (hub ids, hub-layout directories, files) -> formats (one converter per source shape) ->
validate (row checks) -> loading (a split, problems reported by file and line) -> mixture (a run's
train and eval data, one source or a mix) -> template (chat template, loss spans) -> tokenize (ids and
labels) -> prepared (the run's rows, cached on disk) -> collate (padded batches). inspect reports on
all of it before training.
"""

from chattune.data.loading import LoadedSplit, Problem, holdout_split, load_conversations, report
from chattune.data.sources import list_splits

__all__ = ["LoadedSplit", "Problem", "holdout_split", "list_splits", "load_conversations", "report"]
